"""The README as a new user reads it: its runnable snippets run on a demo-shaped run, its Configuration table holds
every key once, `sinktrace --help` fits a screen, and the first minutes (a typo, Ctrl-C) end in one line."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from pipeline import cli, demo, report
from pipeline.settings import known_keys
from pipeline.store.cube import open_sinks

README = Path(__file__).resolve().parents[1] / "README.md"
# A fenced block the README marks `<!-- runnable -->` on the line before it runs as printed, on the demo run.
RUNNABLE = re.compile(r"^<!-- runnable -->\n```(python|bash)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SNIPPETS = RUNNABLE.findall(README.read_text())


def sinktrace(*args: str) -> int:
    """The `sinktrace` command, in this process: its exit status."""
    from hydra.core.global_hydra import GlobalHydra

    argv = sys.argv
    sys.argv = ["sinktrace", *args]
    try:
        cli.main()
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()  # hydra.main leaves it set (a multirun, --help)
    raise AssertionError("sinktrace returned without an exit status")


def commands(script: str) -> list[list[str]]:
    """A bash snippet's command lines (comments dropped, `\\` continuations joined), each as its argv."""
    lines = script.replace("\\\n", " ").splitlines()
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv]


# ------------------------------------------------------------------------------------------- runnable snippets


@pytest.fixture(scope="module")
def demo_home(trained_run, tmp_path_factory, one_thread):
    """A cache folder where the demo run has been replayed, as after the README's set-up command. Its first two
    checkpoints (steps 0 and 50: the same model, the same probe and store group as the 1,500-step demo's) stand in
    for the demo run, so that each command costs a second or two."""
    home = tmp_path_factory.mktemp("readme-home")
    for step in (0, 50):
        shutil.copytree(trained_run / f"checkpoint-{step}", home / "stand-in" / f"checkpoint-{step}")
    with pytest.MonkeyPatch.context() as mp:
        on_the_demo(mp, home)
        assert sinktrace() == 0
    return home


def on_the_demo(mp: pytest.MonkeyPatch, home: Path) -> None:
    mp.setenv("SINKTRACE_HOME", str(home))
    mp.setenv("MPLBACKEND", "Agg")
    mp.setattr(demo, "ensure_demo_run", lambda cache: home / "stand-in")
    # One torch thread, as if the process had one core: on a shared 2-core machine two threads wait for each other.
    mp.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    # The report stage runs as printed but draws no figures: tests/test_report.py checks those, and matplotlib
    # would take seconds per command here.
    mp.setattr(report, "write_report", no_figures)


def no_figures(store: str, out_dir: str | None = None, **kw) -> Path:
    open_sinks(store)  # the store the report would read opens
    return Path(out_dir or f"{store}.report") / "index.html"


@pytest.fixture
def on_demo(demo_home, monkeypatch):
    on_the_demo(monkeypatch, demo_home)
    return demo_home


def run_snippet(kind: str, code: str) -> None:
    if kind == "python":
        exec(compile(code, f"{README}:snippet", "exec"), {"__name__": "__readme__"})
        return
    for argv in commands(code):
        if argv[0] in ("sinktrace", ".venv/bin/sinktrace"):
            args = argv[1:]
        elif argv[:3] == ["python", "-m", "pipeline"]:
            args = argv[3:]
        else:
            raise AssertionError(f"{' '.join(argv)}: a runnable snippet runs sinktrace commands only")
        assert sinktrace(*args) == 0, argv


def test_the_readme_marks_its_runnable_snippets():
    assert {kind for kind, _ in SNIPPETS} == {"python", "bash"}
    assert any("open_datatree" in code for _, code in SNIPPETS)
    assert len(LAYERED) == 1


LAYERED = [(kind, code) for kind, code in SNIPPETS if "max_device_memory" in code]
OTHERS = [snippet for snippet in SNIPPETS if snippet not in LAYERED]


@pytest.mark.parametrize("kind,code", OTHERS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(OTHERS)])
def test_a_runnable_snippet_runs_as_printed_on_the_demo(kind, code, on_demo):
    run_snippet(kind, code)


def test_the_layer_by_layer_snippet_replays_every_step_layer_by_layer(on_demo):
    import pipeline

    run_snippet(*LAYERED[0])
    ds = pipeline.open_sinks(pipeline.demo_store(), "random-T32-r64-s0-bos")
    assert list(ds.replay_route.values) == ["layered", "layered"]


def test_the_xarray_snippet_names_the_group_the_demo_writes(on_demo):
    import pipeline

    (code,) = [code for kind, code in SNIPPETS if "open_datatree" in code]
    group = re.search(r'tree\["([^"]+)"\]', code).group(1)
    assert group in pipeline.open_sinks(pipeline.demo_store()).children


# -------------------------------------------------------------------------------------- the Configuration table


def configuration_section() -> list:
    """The markdown-it tokens of the README's Configuration section."""
    tokens = MarkdownIt("commonmark").enable("table").parse(README.read_text())
    start = next(
        i + 2
        for i, t in enumerate(tokens)
        if t.type == "heading_open" and t.tag == "h2" and tokens[i + 1].content == "Configuration"
    )
    end = next(i for i in range(start, len(tokens)) if tokens[i].type == "heading_open" and tokens[i].tag == "h2")
    return tokens[start:end]


def table_rows(section: list) -> list[list]:
    """Each row of the section's one table: its cells' inline tokens."""
    rows, row = [], None
    for t in section:
        if t.type == "tr_open":
            row = []
        elif t.type == "inline" and row is not None:
            row.append(t)
        elif t.type == "tr_close":
            rows.append(row)
            row = None
    return rows


def test_the_configuration_table_is_one_table_with_every_key_once():
    section = configuration_section()
    assert [t.type for t in section].count("table_open") == 1, "one table (a blank line splits it in two)"
    stray = [t.content for t in section if t.type == "inline" and t.content.lstrip().startswith("|")]
    assert not stray, f"rows that render as text, not as the table: {stray[:2]}"
    header, *rows = table_rows(section)
    assert [c.content for c in header] == ["key", "default", "meaning"]
    assert all(len(row) == 3 for row in rows)

    groups = {"probe", "cluster"}  # config groups: `probe=text`, `cluster=processes`
    known = set(known_keys())
    listed = []
    for row in rows:
        keys = [c.content for c in row[0].children if c.type == "code_inline"]
        assert keys, f"a row names no key: {row[0].content}"
        for key in keys:
            if key.endswith(".*"):
                covered = {k for k in known if k == key[:-2] or k.startswith(key[:-1])}
                assert covered, f"{key}: no key of the schema under it"
                listed += sorted(covered)
            else:
                assert key in known | groups, f"{key}: in the table, not in the schema"
                listed.append(key)
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({k for k in listed if listed.count(k) > 1})}"
    assert known - set(listed) == set(), "keys of the schema missing from the table"
    assert groups <= set(listed)


def test_known_keys_cover_the_composed_config():
    """What `known_keys` lists is what the command composes, for every probe and cluster group."""
    from omegaconf import OmegaConf

    from pipeline.settings import compose

    composed = set()
    for overrides in (
        ["probe=text"],
        ["probe=tokens"],
        [],
        *([f"cluster={c}"] for c in ("processes", "gpus", "slurm")),
    ):
        cfg = OmegaConf.to_container(compose(overrides), resolve=False)
        composed |= {f"{group}.{key}" for group, node in cfg.items() if isinstance(node, dict) for key in node}
        composed |= {key for key, node in cfg.items() if not isinstance(node, dict)}
    scheduler = OmegaConf.to_container(compose(["cluster=scheduler", "cluster.address=tcp://x:1"]).cluster)
    composed |= {f"cluster.{key}" for key in scheduler}
    assert composed == {k for k in known_keys() if k.count(".") <= 1}


# ------------------------------------------------------------------------------------------ the first minutes


@pytest.fixture
def no_demo(monkeypatch):
    def refuse(cache):
        raise AssertionError("the demo was built or replayed")

    monkeypatch.setattr(demo, "ensure_demo_run", refuse)


@pytest.mark.parametrize(
    "arg,says",
    [
        ("+verbos=true", "verbos: no such setting; did you mean verbose?"),
        ("+checkpoint.root=/x", "checkpoint.root: no such setting; did you mean checkpoints.root?"),
        ("+demo.seed=1", "demo.seed: no such setting;"),
        ("+replay.anything=1", "replay.anything: no such setting; replay has batch_size, device, dtype,"),
        ("+probe.packing=stream", "probe.packing: no such setting; probe has first_token, kind, name, rows,"),
        ("+cluster.retriess=1", "cluster.retriess: no such setting; did you mean cluster.retries?"),
        ("replay.batchsize=4", "replay.batchsize: no such setting; did you mean replay.batch_size?"),
    ],
)
def test_an_unknown_key_stops_the_command_in_one_line(arg, says, no_demo, capsys):
    assert sinktrace(arg) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"sinktrace: error: {says}"), err
    assert "demo" not in out


def test_an_appended_builder_argument_is_still_taken():
    """`+cluster.build.<name>=` hands a new argument to what the cluster group builds: no typo check there."""
    from pipeline.settings import check, compose

    cfg = compose(["cluster=processes", "+cluster.build.memory_limit=1GB", "stages=[report]"])
    check(cfg)
    assert cfg.cluster.build.memory_limit == "1GB"


def test_help_is_one_screen_a_person_reads(capsys):
    assert sinktrace("--help") == 0
    page = capsys.readouterr().out
    lines = page.rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, (len(lines), max(map(len, lines)))
    assert "_schema" not in page and "sinktrace check" in page and "--hydra-help" in page
    for word in ("stages", "replay", "report", "compare", "Configuration", "README"):
        assert word in page, word
    settings = [line.split()[0].split("=")[0] for line in lines if re.match(r"  \w+(\.\w+)?=", line)]
    assert settings == ["checkpoints.root", "store.path", "replay.device", "probe.seq_len", "cluster"]
    assert set(settings) <= set(known_keys()) | {"cluster"}

    assert sinktrace("--hydra-help") == 0
    assert "== Flags ==" in capsys.readouterr().out  # Hydra's own page


def test_ctrl_c_while_the_demo_trains_is_one_line_and_exit_130(monkeypatch, sinktrace_home, capsys):
    batches = demo.demo_batch

    def interrupted_at_step_3(task, **kw):
        if kw["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return batches(task, **kw)

    monkeypatch.setattr(demo, "demo_batch", interrupted_at_step_3)
    handler = signal.getsignal(signal.SIGINT)  # whatever the process had (another test's library may have set one)
    assert sinktrace() == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("sinktrace: interrupted by SIGINT while training the demo run; the checkpoints it saved are kept")
    )
    (run,) = (sinktrace_home / "demo").iterdir()
    assert (run / "checkpoint-0" / "trainer_state.json").is_file()  # the rerun resumes from here
    assert not list(run.glob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) is handler


def test_discovery_says_a_trainer_checkpoint_without_its_state_is_still_being_written(trained_run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoint-0", root / "checkpoint-0")
    shutil.copytree(trained_run / "checkpoint-50", root / "checkpoint-50")
    (root / "checkpoint-50" / "trainer_state.json").unlink()
    args = ("stages=[replay]", "probe.rows=2", "checkpoints.quiet_seconds=0", f"store.path={tmp_path / 's.zarr'}")
    assert sinktrace(f"checkpoints.root={root}", *args) == 0
    out = capsys.readouterr().out
    assert (
        f"skipped step 50 ({root / 'checkpoint-50'}): still being written: it holds the Trainer's "
        "optimizer or scheduler state but no trainer_state.json, which the Trainer writes last"
    ) in out
