"""Helpers shared by the eval-tool tests."""
import pytest


def usage_error(capsys, main, argv) -> str:
    """Run an entry point that must refuse `argv` as argparse does (exit code 2, one line, no traceback); returns the
    error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, (e.value.code, err)
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]
