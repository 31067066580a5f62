"""Pairwise caption comparison by an LLM judge, the UAE paper's caption-quality protocol: for each image the judge
sees two captions (and optionally the image), scores each 1-10 on comprehensiveness/accuracy, fluency and
compositional insight, and gives a final verdict.

Position bias is controlled by judging every pair twice, once in each order, and mapping the verdicts back to the
systems: a system wins an image when it collects more of the two verdicts (a "tie" verdict gives half to each), so
a judge that always prefers whichever caption comes first produces ties, not wins. An answer that cannot be parsed,
or a request that still fails after the retries, makes that image invalid: it is counted and kept in the output
with the raw answer, and left out of the win rates and means.

The judge is any HTTP endpoint speaking the OpenAI chat-completions protocol; only the standard library is used.

    python -m eval.caption_judge ours.jsonl baseline.json --images bench/images --url http://127.0.0.1:8000/v1 \
        --model Qwen2.5-VL-72B-Instruct --out judge.json [--api-key-env OPENAI_API_KEY]

Caption files: JSONL with one {"image": name, "caption": text} per line, or JSON: {name: caption}, a list of
{"image", "caption"} objects, or {"captions": {name: caption}, "skipped": [...]} (what eval.caption --out and
eval.unified_bench's captions.json hold). Names are matched by file stem. --out is rewritten after every image
("complete": false until the last), so an interrupted run keeps its judgements.
"""
from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from eval.cli import at_least, parser, positive_float, refuse_overwrite, write_json
from model.image_io import IMAGE_SUFFIXES

CRITERIA = ("comprehensiveness", "fluency", "insight")
VERDICTS = ("A", "B", "tie")

SYSTEM_PROMPT = "You are a meticulous, impartial judge of image captions. You answer with one JSON object only."

USER_TEMPLATE = """Two captions describe the same image. Judge them on three criteria, each scored from 1 (worst) to
10 (best):
- comprehensiveness: covers every salient object, attribute, count, text, position, background and style, and states
  nothing that is not there (accuracy: hallucinated or wrong details cost more than omissions);
- fluency: grammatical, clear, well organised and free of repetition;
- insight: captures the composition, i.e. spatial layout, relations between objects, viewpoint, lighting and
  overall structure, well enough that an artist could redraw the image from the caption alone.
{image_note}Judge content, not length: a longer caption is better only if the extra text is correct and useful. The
order in which the captions are shown must not influence you.

[Caption A]
{caption_a}

[Caption B]
{caption_b}

Answer with exactly this JSON object and nothing else:
{{"reason": "<two or three sentences>", "A": {{"comprehensiveness": <1-10>, "fluency": <1-10>, "insight": <1-10>}},
"B": {{"comprehensiveness": <1-10>, "fluency": <1-10>, "insight": <1-10>}}, "verdict": "A" or "B" or "tie"}}
"""

IMAGE_NOTE = "The image is attached: check every claim of both captions against it.\n"
NO_IMAGE_NOTE = "The image is not available: judge accuracy by internal consistency and plausibility.\n"


# ----------------------------------------------------------------------------------------------- prompt

def image_data_url(path: str | Path) -> str:
    """The image file as a base64 data URL, the form chat-completions servers accept in an `image_url` part."""
    path = Path(path)
    mime = mimetypes.guess_type(path.name)[0]
    if mime is None or not mime.startswith("image/"):
        raise ValueError(f"{path}: not an image file name (suffix {path.suffix!r})")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def build_messages(caption_a: str, caption_b: str, image_url: str | None = None) -> list[dict]:
    """Chat-completions messages asking the judge to compare caption A and caption B (in that order)."""
    text = USER_TEMPLATE.format(caption_a=caption_a.strip(), caption_b=caption_b.strip(),
                                image_note=IMAGE_NOTE if image_url else NO_IMAGE_NOTE)
    content: str | list[dict] = text
    if image_url:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


# ----------------------------------------------------------------------------------------------- parsing

class JudgeParseError(ValueError):
    """The judge's answer has no usable scores or verdict."""


@dataclass
class Judgement:
    """One judge answer in prompt positions: scores["A"][criterion], scores["B"][criterion], verdict in VERDICTS."""
    scores: dict[str, dict[str, float]]
    verdict: str


def _score(value, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise JudgeParseError(f"{where}: score {value!r} is not a number") from None
    if not 1.0 <= x <= 10.0:
        raise JudgeParseError(f"{where}: score {x} is outside 1-10")
    return x


def _verdict(value) -> str:
    v = str(value).strip().strip(".").lower()
    v = re.sub(r"^caption\s+", "", v)
    for name in VERDICTS:
        if v == name.lower():
            return name
    raise JudgeParseError(f"verdict {value!r} is not one of {VERDICTS}")


def _from_object(obj) -> Judgement:
    if not isinstance(obj, dict):
        raise JudgeParseError(f"expected a JSON object, got {type(obj).__name__}")
    scores = {}
    for pos in ("A", "B"):
        block = obj.get(pos)
        if not isinstance(block, dict):
            raise JudgeParseError(f"no score object for caption {pos}")
        lowered = {str(k).lower(): v for k, v in block.items()}
        missing = [c for c in CRITERIA if c not in lowered]
        if missing:
            raise JudgeParseError(f"caption {pos} lacks scores for {missing}")
        scores[pos] = {c: _score(lowered[c], f"{pos}.{c}") for c in CRITERIA}
    if "verdict" not in obj:
        raise JudgeParseError("no verdict")
    return Judgement(scores, _verdict(obj["verdict"]))


def _from_regex(text: str) -> Judgement:
    """Fallback for almost-JSON (single quotes, trailing commas, comments): the flat {...} block after each of the
    keys A and B, the criterion scores inside it, and the verdict after the word verdict."""
    scores = {}
    for pos in ("A", "B"):
        block = re.search(rf"""["']?\b{pos}\b["']?\s*:\s*\{{([^{{}}]*)\}}""", text)
        if block is None:
            raise JudgeParseError(f"no score block for caption {pos}")
        scores[pos] = {}
        for c in CRITERIA:
            m = re.search(rf"""["']?{c}["']?\s*[:=]\s*["']?(-?\d+(?:\.\d+)?)""", block.group(1), re.IGNORECASE)
            if m is None:
                raise JudgeParseError(f"caption {pos} lacks a score for {c}")
            scores[pos][c] = _score(m.group(1), f"{pos}.{c}")
    # A and B are matched in capitals only, so that "verdict: a clear win for B" does not read as A.
    m = re.search(r"""(?i:verdict)["']?\s*[:=]?\s*["']?(?:(?i:caption)\s+)?(A|B|(?i:tie))\b""", text)
    if m is None:
        raise JudgeParseError("no verdict")
    return Judgement(scores, _verdict(m.group(1)))


def parse_judgement(text: str) -> Judgement:
    """Parse a judge answer: a JSON object, possibly inside ```json fences or surrounded by prose; failing that,
    the regex fallback. Raises JudgeParseError saying what is wrong."""
    candidates = [m.group(1) for m in re.finditer(r"```(?:json)?\s*(.*?)```", text, re.DOTALL | re.IGNORECASE)]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start:end + 1])
    first_error = None
    for cand in candidates:
        try:
            return _from_object(json.loads(cand))
        except json.JSONDecodeError:
            continue
        except JudgeParseError as e:  # valid JSON with wrong content: the regex would only find the same problem
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    try:
        return _from_regex(text)
    except JudgeParseError as e:
        raise JudgeParseError(f"no JSON object and {e}") from None


# ----------------------------------------------------------------------------------------------- client

class JudgeRequestError(RuntimeError):
    """The endpoint did not give a usable answer (after the retries, where retrying made sense)."""


@dataclass
class ChatClient:
    """POST {url}/chat/completions (or `url` itself when it already ends in /chat/completions) with urllib.
    Connection errors, timeouts, HTTP 408/429/5xx and non-JSON bodies are retried `retries` times with exponential
    backoff; other HTTP errors fail at once. The API key, if any, is read from the environment variable named by
    `api_key_env` and sent as a Bearer token."""
    url: str
    model: str
    api_key_env: str | None = None
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 2.0
    temperature: float = 0.0
    max_tokens: int = 1024
    endpoint: str = field(init=False)

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if not self.model:
            raise ValueError("model must be a non-empty model name")
        if self.retries < 0 or self.timeout <= 0:
            raise ValueError(f"retries must be >= 0 and timeout > 0, got {self.retries} and {self.timeout}")
        base = self.url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(f"api_key_env names the environment variable {self.api_key_env!r}, which is not set")

    def complete(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {e.code} from {self.endpoint}: {detail}"
                if e.code in (408, 429) or e.code >= 500:
                    continue
                raise JudgeRequestError(last) from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                last = f"{self.endpoint}: {getattr(e, 'reason', e)}"
                continue
            try:
                data = json.loads(raw)
            except json.JSONDecodeError:
                last = f"{self.endpoint} answered with a body that is not JSON: {raw[:200]!r}"
                continue
            return _message_text(data, self.endpoint)
        raise JudgeRequestError(f"gave up after {self.retries + 1} attempts; last error: {last}")


def _message_text(data, endpoint: str) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeRequestError(f"{endpoint} answered without choices[0].message.content: "
                                f"{json.dumps(data)[:300]}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise JudgeRequestError(f"{endpoint} answered with content of type {type(content).__name__}")
    return content


# ----------------------------------------------------------------------------------------------- comparison

def judge_pair(client: ChatClient, caption_0: str, caption_1: str, image_url: str | None = None) -> dict:
    """Judge system 0's caption against system 1's in both orders. Returns {"orders": [...], "winner": 0 | 1 |
    "tie" | None, "scores": [system 0, system 1] per-criterion means over the two orders, or None}; winner None
    means invalid (some order failed to parse or to arrive)."""
    orders = []
    for order, (a, b) in (("01", (caption_0, caption_1)), ("10", (caption_1, caption_0))):
        record = {"order": order, "valid": False}
        try:
            record["raw"] = client.complete(build_messages(a, b, image_url))
            j = parse_judgement(record["raw"])
        except (JudgeRequestError, JudgeParseError) as e:
            record["error"] = str(e)
        else:
            record.update(valid=True, scores=j.scores, verdict=j.verdict)
        orders.append(record)
    if not all(o["valid"] for o in orders):
        return {"orders": orders, "winner": None, "scores": None}
    points = [0.0, 0.0]
    scores = [{c: 0.0 for c in CRITERIA} for _ in range(2)]
    for o in orders:
        system_at = {"A": int(o["order"][0]), "B": int(o["order"][1])}
        if o["verdict"] == "tie":
            points[0] += 0.5
            points[1] += 0.5
        else:
            points[system_at[o["verdict"]]] += 1.0
        for pos, system in system_at.items():
            for c in CRITERIA:
                scores[system][c] += o["scores"][pos][c] / len(orders)
    winner = "tie" if points[0] == points[1] else int(points[1] > points[0])
    return {"orders": orders, "winner": winner, "scores": scores}


def summarize(results: list[dict], names: tuple[str, str]) -> dict:
    """Win rates (over valid images; ties reported separately and as half-wins), per-criterion means per system,
    invalid counts, and two position-bias diagnostics: how often the two orders agree, and how often the judge
    picked the caption shown first."""
    valid = [r for r in results if r["winner"] is not None]
    n = len(valid)
    wins = [sum(r["winner"] == s for r in valid) for s in (0, 1)]
    ties = sum(r["winner"] == "tie" for r in valid)
    calls = [o for r in results for o in r["orders"]]
    valid_calls = [o for o in calls if o["valid"]]
    decided = [o for o in valid_calls if o["verdict"] != "tie"]
    agree = sum(_system_of(r["orders"][0]) == _system_of(r["orders"][1]) for r in valid)

    def rate(k):
        return k / n if n else None

    out = {
        "systems": list(names),
        "n_images": len(results),
        "n_valid": n,
        "n_invalid": len(results) - n,
        "n_calls": len(calls),
        "n_invalid_calls": len(calls) - len(valid_calls),
        "wins": {names[s]: wins[s] for s in (0, 1)},
        "ties": ties,
        "win_rate": {names[s]: rate(wins[s]) for s in (0, 1)},
        "tie_rate": rate(ties),
        "win_rate_ties_half": {names[s]: rate(wins[s] + 0.5 * ties) for s in (0, 1)},
        "mean_scores": {names[s]: ({c: sum(r["scores"][s][c] for r in valid) / n for c in CRITERIA} if n else None)
                        for s in (0, 1)},
        "order_agreement": rate(agree),
        "first_position_preference": (sum(o["verdict"] == "A" for o in decided) / len(decided)) if decided else None,
    }
    for s in (0, 1):
        if n:
            means = out["mean_scores"][names[s]]
            means["overall"] = sum(means[c] for c in CRITERIA) / len(CRITERIA)
    return out


def _system_of(order: dict):
    """The system (0 or 1) an order's verdict picked, or "tie"."""
    return "tie" if order["verdict"] == "tie" else int(order["order"]["AB".index(order["verdict"])])


# ----------------------------------------------------------------------------------------------- files and CLI

def load_captions(path: str | Path) -> dict[str, str]:
    """{image stem: caption} from a JSONL file ({"image", "caption"} per line) or a JSON file ({name: caption}, a
    list of {"image", "caption"} objects, or eval.caption's {"captions": {name: caption}, "skipped": [...]}, whose
    skipped images have no caption)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[str, object]] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            rows.append(_row(obj, f"{path}:{i}"))
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict) and set(obj) == {"captions", "skipped"} and isinstance(obj["captions"], dict):
            rows = list(obj["captions"].items())
        elif isinstance(obj, dict):
            rows = list(obj.items())
        elif isinstance(obj, list):
            rows = [_row(o, f"{path}[{i}]") for i, o in enumerate(obj)]
        else:
            raise ValueError(f"{path}: expected a JSON object or list, got {type(obj).__name__}")
    captions: dict[str, str] = {}
    for name, caption in rows:
        if not isinstance(caption, str):
            raise ValueError(f"{path}: the caption of {name!r} is {type(caption).__name__}, not a string")
        key = Path(str(name)).stem
        if key in captions:
            raise ValueError(f"{path}: two captions for image {key!r}")
        captions[key] = caption
    return captions


def _row(obj, where: str) -> tuple[str, object]:
    if not isinstance(obj, dict) or "image" not in obj or "caption" not in obj:
        raise ValueError(f"{where}: expected an object with keys 'image' and 'caption', got {str(obj)[:100]}")
    return obj["image"], obj["caption"]


def find_images(folder: str | Path, names: list[str]) -> dict[str, Path]:
    """{stem: image file} for every name; raises naming the stems that have no image in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is not a folder")
    by_stem = {f.stem: f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
    missing = [n for n in names if n not in by_stem]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have captions but no file in {folder}: {missing[:5]}")
    return {n: by_stem[n] for n in names}


def select_images(captions: tuple[dict[str, str], dict[str, str]], names: tuple[str, str],
                  images: str | Path | None = None, limit: int = 0) -> tuple[list[str], dict[str, Path]]:
    """The names to judge (captioned by both systems, sorted, the first `limit` if > 0) and their image files
    ({} without `images`); ValueError when there is nothing to judge or an image is missing."""
    common = sorted(set(captions[0]) & set(captions[1]))
    if not common:
        raise ValueError(f"the caption files of {names[0]} and {names[1]} share no image name")
    if limit > 0:
        common = common[:limit]
    return common, find_images(images, common) if images else {}


def run(captions: tuple[dict[str, str], dict[str, str]], names: tuple[str, str], client: ChatClient,
        images: str | Path | None = None, limit: int = 0, log=print, out: Path | None = None) -> dict:
    """Judge every image `select_images` picks (at least one); the report is rewritten to `out` after every image."""
    common, files = select_images(captions, names, images, limit)
    results = []
    for i, name in enumerate(common):
        url = image_data_url(files[name]) if files else None
        r = {"image": name, **judge_pair(client, captions[0][name], captions[1][name], url)}
        results.append(r)
        shown = "invalid" if r["winner"] is None else ("tie" if r["winner"] == "tie" else names[r["winner"]])
        log(f"[{i + 1}/{len(common)}] {name}: {shown}")
        summary = summarize(results, names)
        summary["only_in_one_file"] = {names[s]: len(set(captions[s]) - set(captions[1 - s])) for s in (0, 1)}
        report = {"summary": summary, "judge": {"endpoint": client.endpoint, "model": client.model},
                  "complete": i + 1 == len(common), "items": results}
        if out is not None:
            write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> dict:
    p = parser("python -m eval.caption_judge", __doc__)
    p.add_argument("captions_a", help="captions of the first system (.jsonl or .json)")
    p.add_argument("captions_b", help="captions of the second system (.jsonl or .json)")
    p.add_argument("--images", default=None, help="folder of the source images, sent to the judge (default: "
                                                  "none, text only)")
    p.add_argument("--url", required=True, help="chat-completions base URL (e.g. http://host:8000/v1) or full URL")
    p.add_argument("--model", required=True, help="judge model name sent in the request")
    p.add_argument("--out", required=True, help="output JSON: summary and every judgement with its raw answer")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--names", nargs=2, default=None, metavar=("A", "B"),
                   help="system names (default: the caption files' stems)")
    p.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key "
                                                       "(default: no key)")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=at_least(0), default=3,
                   help="retries per request on connection errors, 408/429/5xx")
    p.add_argument("--backoff", type=at_least(0.0, float), default=2.0,
                   help="first retry delay in seconds, doubled each retry")
    p.add_argument("--max-tokens", type=at_least(1), default=1024, help="max tokens of the judge's answer")
    p.add_argument("--limit", type=at_least(0), default=0, help="judge only the first N images (0 = all)")
    a = p.parse_args(argv)
    names = tuple(a.names) if a.names else (Path(a.captions_a).stem, Path(a.captions_b).stem)
    if names[0] == names[1]:
        p.error(f"both systems are called {names[0]!r}: pass --names")
    captions = []
    for option, path in (("captions_a", a.captions_a), ("captions_b", a.captions_b)):
        try:
            captions.append(load_captions(path))
        except (OSError, ValueError) as e:  # OSError: missing or unreadable; both name the file
            p.error(f"argument {option}: {e}")
    try:
        client = ChatClient(a.url, a.model, api_key_env=a.api_key_env, timeout=a.timeout, retries=a.retries,
                            backoff=a.backoff, max_tokens=a.max_tokens)
        select_images((captions[0], captions[1]), names, a.images, a.limit)
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out)
    refuse_overwrite(p, [out], a.overwrite)
    report = run((captions[0], captions[1]), names, client, a.images, a.limit, out=out)
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
