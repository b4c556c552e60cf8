"""The README stays true: its Python examples run, its commands exist, and the demo makes its plot."""

import re
from pathlib import Path

from ssmkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no Python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "outputs" / "ckpt" / "model.safetensors").exists()


def test_first_screen_gives_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)


def test_every_ssmkit_subcommand_in_the_readme_exists():
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)
    used = set(re.findall(r"^(?:torchrun .* -m )?ssmkit (\w+)", README, flags=re.M))
    assert used and used <= known, used - known


def test_foundation_demo_writes_its_plot(tmp_path, capsys):
    from ssmkit.demo import main

    main(["--out", str(tmp_path), "--length", "256"])
    out = capsys.readouterr().out
    assert (tmp_path / "hippo_reconstruction.png").stat().st_size > 10_000
    assert "legs: relative RMSE" in out


def test_mixer_table_matches_the_registry():
    """The README's mixer table lists every registered mixer once, with the pattern letter its class declares."""
    from ssmkit.layers import MIXERS

    table = re.findall(r"^\| [^|]+ \| `(\w+)` \| `(.)` \|", README, flags=re.M)
    assert dict(table) == {name: cls.pattern_letter for name, cls in MIXERS.items()}
    assert len(table) == len(MIXERS)
