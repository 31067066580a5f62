"""eval/caption_judge.py against a local fake chat-completions server with canned judge behaviours."""
import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import eval.caption_judge as cj
from eval.caption_judge import (CRITERIA, ChatClient, JudgeParseError, build_messages, image_data_url, judge_pair,
                                load_captions, find_images, main, parse_judgement, summarize)
from tests.cli_helpers import usage_error

GOOD_SCORES = {"comprehensiveness": 9, "fluency": 8, "insight": 7}
BAD_SCORES = {"comprehensiveness": 4, "fluency": 5, "insight": 6}


def answer_json(a_scores, b_scores, verdict):
    return json.dumps({"reason": "because", "A": a_scores, "B": b_scores, "verdict": verdict})


class FakeJudge:
    """Behaviour chosen by markers in the captions it is shown:
    GOOD marks the better caption (the judge is fair: it follows GOOD in either position; neither = tie);
    BIASED: always prefers position A; HALF: A if GOOD is in A, else "tie"; MALFORMED: prose, no scores;
    FENCED: the JSON inside ```json fences with prose around; FLAKY: HTTP 500 on the first request, then fair;
    DOWN: always HTTP 500; REJECT: HTTP 400; SLOW: the first request answers after 1 s, then fair."""

    def __init__(self):
        self.requests = []
        self.seen = set()
        self.lock = threading.Lock()

    def respond(self, path, headers, body):
        with self.lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            first = not any(m in self.seen for m in ("FLAKY", "SLOW") if m in json.dumps(body))
            self.seen.update(m for m in ("FLAKY", "SLOW") if m in json.dumps(body))
        if path != "/v1/chat/completions":
            return 404, {"error": "not found"}, 0.0
        user = body["messages"][-1]["content"]
        text = user if isinstance(user, str) else next(p["text"] for p in user if p["type"] == "text")
        a = text.split("[Caption A]\n", 1)[1].split("\n\n[Caption B]", 1)[0]
        b = text.split("[Caption B]\n", 1)[1].split("\n\nAnswer with", 1)[0]
        both = a + b
        if "DOWN" in both or ("FLAKY" in both and first):
            return 500, {"error": "overloaded"}, 0.0
        if "REJECT" in both:
            return 400, {"error": "bad request"}, 0.0
        delay = 1.0 if ("SLOW" in both and first) else 0.0
        good_pos = "A" if "GOOD" in a else ("B" if "GOOD" in b else None)
        scores = {"A": GOOD_SCORES if good_pos == "A" else BAD_SCORES,
                  "B": GOOD_SCORES if good_pos == "B" else BAD_SCORES}
        if "MALFORMED" in both:
            content = "Both captions are nice, I prefer the first one."
        elif "BIASED" in both:
            content = answer_json(scores["A"], scores["B"], "A")
        elif "HALF" in both:
            content = answer_json(scores["A"], scores["B"], "A" if good_pos == "A" else "tie")
        else:
            content = answer_json(scores["A"], scores["B"], good_pos or "tie")
            if "FENCED" in both:
                content = f"Here is my judgement:\n```json\n{content}\n```\nThanks."
        return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}, delay


@pytest.fixture
def judge_server():
    fake = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload, delay = fake.respond(self.path, dict(self.headers), body)
            time.sleep(delay)
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def client(url, **kw):
    return ChatClient(url, "fake-judge", **{"timeout": 5.0, "retries": 2, "backoff": 0.0, **kw})


def shown_order(request):
    text = request["body"]["messages"][-1]["content"]
    text = text if isinstance(text, str) else text[-1]["text"]
    return text.index("[Caption A]"), text


# ----------------------------------------------------------------------------------------------- parsing

def test_parse_plain_fenced_and_almost_json():
    plain = answer_json(GOOD_SCORES, BAD_SCORES, "A")
    j = parse_judgement(plain)
    assert j.verdict == "A" and j.scores["A"] == GOOD_SCORES and j.scores["B"] == BAD_SCORES
    fenced = f"Sure.\n```json\n{answer_json(BAD_SCORES, GOOD_SCORES, 'Caption B')}\n```\nDone."
    assert parse_judgement(fenced).verdict == "B"
    almost = ("{'A': {'comprehensiveness': 7, 'fluency': 8.5, 'insight': 6,}, "
              "'B': {'Comprehensiveness': 3, 'fluency': 9, 'insight': 2}, 'verdict': 'tie',}")
    j = parse_judgement(almost)
    assert j.verdict == "tie" and j.scores["A"]["fluency"] == 8.5 and j.scores["B"]["comprehensiveness"] == 3
    assert parse_judgement(plain.replace('"A"}', '"TIE"}')).verdict == "tie"


@pytest.mark.parametrize("text,reason", [
    ("I prefer the first caption.", "no JSON object"),
    (answer_json(GOOD_SCORES, {**BAD_SCORES, "fluency": 11}, "A"), "outside 1-10"),
    (answer_json(GOOD_SCORES, {"fluency": 3}, "A"), "lacks scores"),
    (json.dumps({"A": GOOD_SCORES, "B": BAD_SCORES}), "no verdict"),
    (answer_json(GOOD_SCORES, BAD_SCORES, "C"), "not one of"),
    (answer_json(GOOD_SCORES, {**BAD_SCORES, "insight": "great"}, "A"), "not a number"),
    ("{'A': {'fluency': 3}, verdict: a clear win for B}", "lacks a score"),
])
def test_parse_rejects_with_reason(text, reason):
    with pytest.raises(JudgeParseError, match=reason):
        parse_judgement(text)


def test_messages_and_image_url(tmp_path):
    msgs = build_messages("first caption", "second caption")
    text = msgs[-1]["content"]
    assert isinstance(text, str) and text.index("first caption") < text.index("[Caption B]") < text.index("second")
    for c in CRITERIA:
        assert c in text
    img = tmp_path / "x.png"
    Image.new("RGB", (3, 2), (10, 20, 30)).save(img)
    url = image_data_url(img)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == img.read_bytes()
    parts = build_messages("a", "b", url)[-1]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": url}} and parts[1]["type"] == "text"
    with pytest.raises(ValueError, match="not an image"):
        image_data_url(tmp_path / "notes.txt")


# ----------------------------------------------------------------------------------------------- judging

def test_order_swapping_maps_verdicts_and_scores_back(judge_server):
    fake, url = judge_server
    r = judge_pair(client(url), "a GOOD caption", "a plain caption")
    assert r["winner"] == 0
    assert [o["verdict"] for o in r["orders"]] == ["A", "B"]  # the fair judge followed GOOD into position B
    first, second = (shown_order(q)[1] for q in fake.requests)
    assert first.index("GOOD") < first.index("[Caption B]") and second.index("GOOD") > second.index("[Caption B]")
    assert r["scores"][0] == GOOD_SCORES and r["scores"][1] == BAD_SCORES
    r = judge_pair(client(url), "plain", "GOOD one, FENCED")
    assert r["winner"] == 1 and all(o["valid"] for o in r["orders"])


def test_position_bias_becomes_a_tie(judge_server):
    _, url = judge_server
    r = judge_pair(client(url), "GOOD but BIASED judge", "plain")
    assert r["winner"] == "tie" and [o["verdict"] for o in r["orders"]] == ["A", "A"]
    s = summarize([r], ("x", "y"))
    assert s["ties"] == 1 and s["order_agreement"] == 0.0 and s["first_position_preference"] == 1.0
    half = judge_pair(client(url), "plain HALF", "GOOD")  # "tie" in one order, system 1 in the other
    assert half["winner"] == 1


def test_malformed_answer_is_invalid_and_counted(judge_server):
    _, url = judge_server
    r = judge_pair(client(url), "MALFORMED", "other")
    assert r["winner"] is None and r["scores"] is None
    assert all(not o["valid"] and "no JSON object" in o["error"] and o["raw"].startswith("Both") for o in r["orders"])
    s = summarize([r, judge_pair(client(url), "GOOD", "x")], ("x", "y"))
    assert s["n_images"] == 2 and s["n_valid"] == 1 and s["n_invalid"] == 1 and s["n_invalid_calls"] == 2
    assert s["win_rate"] == {"x": 1.0, "y": 0.0}


def test_retries_on_500_then_success(judge_server):
    fake, url = judge_server
    r = judge_pair(client(url), "GOOD FLAKY", "plain")
    assert r["winner"] == 0 and len(fake.requests) == 3  # one 500, then both orders


def test_gives_up_after_bounded_retries_and_does_not_retry_400(judge_server):
    fake, url = judge_server
    r = judge_pair(client(url, retries=2), "DOWN", "plain")
    assert r["winner"] is None and len(fake.requests) == 2 * 3
    assert "gave up after 3 attempts" in r["orders"][0]["error"] and "HTTP 500" in r["orders"][0]["error"]
    fake.requests.clear()
    r = judge_pair(client(url), "REJECT", "plain")
    assert r["winner"] is None and len(fake.requests) == 2 and "HTTP 400" in r["orders"][0]["error"]


def test_timeout_is_retried(judge_server):
    fake, url = judge_server
    r = judge_pair(client(url, timeout=0.3), "GOOD SLOW", "plain")
    assert r["winner"] == 0 and len(fake.requests) == 3


def test_full_url_and_api_key(judge_server, monkeypatch):
    fake, url = judge_server
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sekret")
    c = client(url + "/chat/completions/", api_key_env="FAKE_JUDGE_KEY")
    assert c.endpoint == url + "/chat/completions"
    assert judge_pair(c, "GOOD", "x")["winner"] == 0
    req = fake.requests[0]
    assert req["headers"]["Authorization"] == "Bearer sekret" and req["body"]["model"] == "fake-judge"
    wrong = judge_pair(client(url.replace("/v1", "/v2")), "GOOD", "x")
    assert wrong["winner"] is None and "HTTP 404" in wrong["orders"][0]["error"]
    monkeypatch.delenv("FAKE_JUDGE_KEY")
    with pytest.raises(ValueError, match="FAKE_JUDGE_KEY"):
        client(url, api_key_env="FAKE_JUDGE_KEY")
    with pytest.raises(ValueError, match="url"):
        ChatClient("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="model"):
        ChatClient(url, "")


# ----------------------------------------------------------------------------------------------- win rates

def fake_result(winner, s0, s1, verdicts=("A", "B")):
    orders = [{"order": "01", "valid": True, "verdict": verdicts[0]},
              {"order": "10", "valid": True, "verdict": verdicts[1]}]
    return {"orders": orders, "winner": winner,
            "scores": [dict(zip(CRITERIA, s0)), dict(zip(CRITERIA, s1))]}


def test_summary_win_rate_math():
    results = [
        fake_result(0, (8, 8, 8), (2, 2, 2)),                       # orders agree on system 0
        fake_result(0, (6, 7, 8), (5, 5, 5)),                       # agree
        fake_result(1, (1, 2, 3), (9, 9, 9), ("B", "A")),           # agree on system 1
        fake_result("tie", (5, 5, 5), (5, 5, 5), ("A", "A")),       # position bias: disagree
        {"orders": [{"order": "01", "valid": False}, {"order": "10", "valid": True, "verdict": "A"}],
         "winner": None, "scores": None},
    ]
    s = summarize(results, ("ours", "base"))
    assert (s["n_images"], s["n_valid"], s["n_invalid"], s["n_calls"], s["n_invalid_calls"]) == (5, 4, 1, 10, 1)
    assert s["wins"] == {"ours": 2, "base": 1} and s["ties"] == 1
    assert s["win_rate"] == {"ours": 0.5, "base": 0.25} and s["tie_rate"] == 0.25
    assert s["win_rate_ties_half"] == {"ours": 0.625, "base": 0.375}
    assert s["mean_scores"]["ours"]["comprehensiveness"] == pytest.approx((8 + 6 + 1 + 5) / 4)
    assert s["mean_scores"]["base"]["insight"] == pytest.approx((2 + 5 + 9 + 5) / 4)
    assert s["mean_scores"]["ours"]["overall"] == pytest.approx((24 + 21 + 6 + 15) / 12)
    assert s["order_agreement"] == 0.75
    # verdicts of the 9 valid calls: A B | A B | B A | A A | A (the invalid image's valid call counts too)
    assert s["first_position_preference"] == pytest.approx(6 / 9)
    empty = summarize([results[-1]], ("ours", "base"))
    assert empty["win_rate"] == {"ours": None, "base": None} and empty["mean_scores"]["ours"] is None


# ----------------------------------------------------------------------------------------------- files and CLI

def test_cli_end_to_end(judge_server, tmp_path, capsys):
    fake, url = judge_server
    images = tmp_path / "images"
    images.mkdir()
    for name in ("cat", "dog", "sky"):
        Image.new("RGB", (4, 4), (len(name), 0, 0)).save(images / f"{name}.png")
    ours = tmp_path / "ours.jsonl"
    ours.write_text("\n".join(json.dumps({"image": f"{n}.png", "caption": c}) for n, c in
                              [("cat", "a GOOD cat"), ("dog", "a dog MALFORMED"), ("sky", "blue sky"),
                               ("extra", "only here")]) + "\n")
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"cat": "a cat", "dog": "a dog", "sky": "a GOOD sky"}))
    out = tmp_path / "res" / "judge.json"
    report = main([str(ours), str(base), "--images", str(images), "--url", url, "--model", "fake-judge",
                   "--out", str(out), "--retries", "1", "--backoff", "0", "--timeout", "5"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    s = saved["summary"]
    assert s["systems"] == ["ours", "base"] and s["n_images"] == 3 and s["n_invalid"] == 1
    assert s["wins"] == {"ours": 1, "base": 1} and s["only_in_one_file"] == {"ours": 1, "base": 0}
    assert [it["image"] for it in saved["items"]] == ["cat", "dog", "sky"]
    parts = fake.requests[0]["body"]["messages"][-1]["content"]
    assert base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1]) == (images / "cat.png").read_bytes()
    assert '"n_valid": 2' in capsys.readouterr().out


def test_cli_end_to_end_writes_as_it_goes_and_reads_eval_caption_output(judge_server, tmp_path, monkeypatch, capsys):
    """--out once appeared only at the very end: a crash at image 2 of 3 lost every judgement. It is rewritten after
    each image ("complete" false until the last) and never replaces an earlier report without --overwrite."""
    fake, url = judge_server
    ours = tmp_path / "ours.json"  # what eval.caption --out writes
    ours.write_text(json.dumps({"captions": {"x/cat.png": "a GOOD cat", "x/dog.png": "a dog", "x/sky.png": "sky"},
                                "skipped": [{"image": "x/strip.png", "reason": "aspect ratio"}]}))
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"cat": "a cat", "dog": "a GOOD dog", "sky": "a sky", "strip": "a strip"}))
    assert load_captions(ours) == {"cat": "a GOOD cat", "dog": "a dog", "sky": "sky"}
    out = tmp_path / "judge.json"
    args = [str(ours), str(base), "--url", url, "--model", "fake-judge", "--out", str(out), "--backoff", "0"]
    real = cj.judge_pair

    def crash_on_sky(client, a, b, url=None):
        if a == "sky":
            raise KeyboardInterrupt
        return real(client, a, b, url)

    monkeypatch.setattr(cj, "judge_pair", crash_on_sky)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    partial = json.loads(out.read_text())
    assert [it["image"] for it in partial["items"]] == ["cat", "dog"] and partial["complete"] is False
    assert partial["summary"]["wins"] == {"ours": 1, "base": 1}
    monkeypatch.setattr(cj, "judge_pair", real)
    assert "judge.json exist(s) already; pass --overwrite" in usage_error(capsys, main, args)
    report = main(args + ["--overwrite"])
    assert report["complete"] is True and report["summary"]["n_images"] == 3
    assert report["summary"]["only_in_one_file"] == {"ours": 0, "base": 1}
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))


def test_cli_values_are_checked_up_front(tmp_path, capsys, monkeypatch):
    """Bad values once surfaced as tracebacks (ValueError from the client) or were taken as given (--timeout 0)."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"x": "one"}))
    b.write_text(json.dumps({"x": "two"}))
    common = [str(a), str(b), "--url", "http://127.0.0.1:1", "--model", "m", "--out", str(tmp_path / "o.json")]
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    for extra, message in ((["--timeout", "0"], "--timeout: must be > 0, got 0"),
                           (["--retries", "-1"], "--retries: must be >= 0, got -1"),
                           (["--backoff", "nan"], "--backoff: must be finite"),
                           (["--max-tokens", "0"], "--max-tokens: must be >= 1, got 0"),
                           (["--limit", "-2"], "--limit: must be >= 0, got -2"),
                           (["--url", "ftp://x"], "url must start with http:// or https://"),
                           (["--model", ""], "model must be a non-empty model name"),
                           (["--api-key-env", "NO_SUCH_KEY_VAR"], "NO_SUCH_KEY_VAR"),
                           (["--images", str(tmp_path / "nowhere")], "is not a folder")):
        assert message in usage_error(capsys, main, common + extra), extra
    line = usage_error(capsys, main, [str(tmp_path / "missing.json")] + common[1:])
    assert "argument captions_a: " in line and "missing.json" in line
    (tmp_path / "broken.json").write_text("{nope")
    assert "argument captions_b: " in usage_error(capsys, main, [str(a), str(tmp_path / "broken.json")] + common[2:])
    assert not (tmp_path / "o.json").exists()


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "seconds per request (default: 120.0)" in text and "(default: None)" not in text


def test_caption_files_and_images_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with keys 'image' and 'caption'"):
        load_captions(bad)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"image": "a.png", "caption": "x"}, {"image": "a.jpg", "caption": "y"}]))
    with pytest.raises(ValueError, match="two captions for image 'a'"):
        load_captions(dup)
    num = tmp_path / "num.json"
    num.write_text(json.dumps({"a": 3}))
    with pytest.raises(ValueError, match="caption of 'a' is int"):
        load_captions(num)
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    with pytest.raises(ValueError, match="broken.json: not JSON"):
        load_captions(broken)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "imgs" / "a.jpg")
    assert find_images(tmp_path / "imgs", ["a"]) == {"a": tmp_path / "imgs" / "a.jpg"}
    with pytest.raises(ValueError, match=r"1 image\(s\) have captions but no file .*\['b'\]"):
        find_images(tmp_path / "imgs", ["a", "b"])
    with pytest.raises(ValueError, match="is not a folder"):
        find_images(tmp_path / "missing", ["a"])
    (tmp_path / "a.json").write_text(json.dumps({"a": "aaa"}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"z": "zzz"}))
    assert "share no image name" in usage_error(capsys, main, [str(tmp_path / "a.json"), str(other), "--url",
                                                              "http://127.0.0.1:1", "--model", "m", "--out",
                                                              str(tmp_path / "o.json")])
    assert "pass --names" in usage_error(capsys, main, [str(dup), str(dup), "--url", "http://127.0.0.1:1", "--model",
                                                        "m", "--out", str(tmp_path / "o.json")])
