"""docs/extending.md's counts, kept true: a dataset, an SDE, an image sampler, a search algorithm or a scheduler
is added in the places that page names, and nowhere else.

Each test registers a made-up entry in the tables the page names (through monkeypatch, as the edit would) and
runs the code that reads those tables: the space check, the CPU estimate, the report's rungs, the searcher,
the config checks, the command lines, the full run's grids and their MLflow metric names. None of it needs
another edit. A scan of the source backs this up: outside the tables, no module compares anything with an
entry's name, which is how a second place to edit creeps in. Nothing here starts Ray.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import trials.config
import trials.data
from trials.config import IMAGE_SAMPLER_NAMES, SDE_KINDS, TrialConfig
from trials.datasets import DATASETS, Dataset
from tuner import cpu_only
from tuner.report.analysis import stopping_rule
from tuner.search_tables import SCHEDULERS, SEARCH_ALGORITHMS, Scheduler, SearchAlgorithm
from tuner.space import SpaceError, parse_space

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "extending.md"
RECORDED = ROOT / "tests" / "fixtures" / "recorded"
# The product code: the two packages and the three commands (bench/ holds experiments about named strategies).
COMMANDS = ("tune.py", "train.py", "sample.py")
SOURCES = sorted([*ROOT.glob("tuner/**/*.py"), *ROOT.glob("trials/**/*.py"), *(ROOT / c for c in COMMANDS)])


def rebind(monkeypatch, module, name: str, value) -> None:
    """Set `module.name`, and every copy a `from module import name` made, as editing the source would."""
    old = getattr(module, name)
    for mod in list(sys.modules.values()):
        if getattr(mod, name, None) is old and getattr(mod, "__file__", "") and str(ROOT) in mod.__file__:
            monkeypatch.setattr(mod, name, value)


def recorded_space(**search):
    """The recorded experiment's space (tests/fixtures/recorded), with its search settings changed."""
    raw = yaml.safe_load((RECORDED / "space.yaml").read_text())
    raw["search"].update(search)
    return parse_space(raw, str(RECORDED / "space.yaml"))


# ---- the page names places that exist ---------------------------------------------------------------------------
def test_every_place_the_page_names_exists():
    text = PAGE.read_text()
    named = set(re.findall(r"`((?:trials|tuner)[./][\w./]+)`", text))
    assert named, "the page names no place in the code"
    for place in sorted(named):
        if place.endswith(".py"):
            assert (ROOT / place).is_file(), place
            continue
        module, _, attr = place.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), place
    for table in ("SEARCH_ALGORITHMS", "SCHEDULERS", "IMAGE_SAMPLERS", "IMAGE_SAMPLER_NAMES", "SDES", "SDE_KINDS"):
        assert any(p.endswith(f".{table}") for p in named), f"the page does not name {table} in full"


# ---- a scheduler: one entry of tuner.search_tables.SCHEDULERS ------------------------------------------------
HALVING = Scheduler(
    "halving",
    "it halves the field every few steps",
    lambda full, grace, eta: list(range(grace // 2, full, grace // 2)),
    lambda full, grace, eta: 0.75 * full,
    lambda grace, eta: f"halving every {grace // 2} steps",
    lambda full, grace, eta: ("a Tune scheduler", full, grace, eta),
)


def test_a_new_scheduler_is_one_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(SCHEDULERS, "halving", HALVING)
    space = recorded_space(scheduler="halving")  # the space check takes it: steps 20, grace 10, rf 2
    assert space.search.scheduler == "halving"

    # The CPU-only estimate: the steps a trial trains on average, and what the scheduler does, in words.
    assert cpu_only.expected_steps_per_trial(space) == 15
    est = cpu_only.estimate(space, seconds_per_step=1.0, cluster_cpus=2)
    assert est.steps_per_trial == 15 and HALVING.about in cpu_only.explain(space, est, "measured")[1]

    # The report: the rungs the curves draw and the rule the caption says.
    assert stopping_rule(space) == ([5, 10, 15], "halving every 5 steps")
    from tuner.report.curves import learning_curves_figure
    from tuner.report.experiment import load_experiment
    from tuner.report.importance import Importance
    from tuner.report.page import page

    exp = load_experiment(RECORDED, space)
    drawn = {t.get_text() for t in learning_curves_figure(exp).axes[0].texts}
    assert {"rung 5", "rung 10", "rung 15"} <= drawn
    assert "Dotted lines: halving every 5 steps" in page(exp, Importance(None, [], ""), {}, {}, None, {})

    # The searcher, the one place the driver turns a space's scheduler into a Tune object.
    from tuner.searcher import build_search, make_scheduler

    assert make_scheduler("halving", 20, 10, 2) == ("a Tune scheduler", 20, 10, 2)
    assert build_search(space, tmp_path)[1] == ("a Tune scheduler", 20, 10, 2)


# ---- a search algorithm: one entry of tuner.search_tables.SEARCH_ALGORITHMS -----------------------------------
def test_a_new_search_algorithm_is_one_entry(monkeypatch, tmp_path):
    import optuna

    asked, made = [], []

    def sampler(seed: int, startup: int):
        asked.append((seed, startup))
        made.append(optuna.samplers.RandomSampler(seed=seed))
        return made[-1]

    monkeypatch.setitem(SEARCH_ALGORITHMS, "coin", SearchAlgorithm("coin", "a made-up sampler", sampler))
    space = recorded_space(algorithm="coin", seed=7)
    assert space.search.algorithm == "coin"

    from tuner.searcher import build_search

    searcher, _ = build_search(space, tmp_path)
    assert asked == [(7, 4)]  # the space's seed and start-up trials (tpe_startup_trials: 4)
    assert searcher.searcher.study.sampler is made[0]  # the study the searcher asks draws with it


def test_a_name_outside_the_search_tables_is_still_refused():
    with pytest.raises(SpaceError, match=f"search.scheduler: must be one of {', '.join(SCHEDULERS)}, got 'halving'"):
        recorded_space(scheduler="halving")
    with pytest.raises(
        SpaceError, match=f"search.algorithm: must be one of {', '.join(SEARCH_ALGORITHMS)}, got 'coin'"
    ):
        recorded_space(algorithm="coin")


# ---- an image sampler: an entry of trials.sampling.IMAGE_SAMPLERS and its name in IMAGE_SAMPLER_NAMES ------------
def test_the_sampler_names_are_the_sampler_tables_keys():
    from trials.sampling import IMAGE_SAMPLERS

    assert IMAGE_SAMPLER_NAMES == tuple(IMAGE_SAMPLERS)


def test_a_new_image_sampler_is_the_two_places_the_page_names(monkeypatch, tmp_path, capsys):
    import torch

    import sample
    from trials.full_run import draw_samples, grid_file
    from trials.sampling import IMAGE_SAMPLERS, Sampler, Samples
    from trials.sde import make_sde
    from tuner.mlflow_runs import full_run_metrics

    def draw(score, sde, shape, **settings):
        return Samples(torch.zeros(shape), 3)

    monkeypatch.setitem(
        IMAGE_SAMPLERS, "sketch", Sampler("sketch", "grey squares", draw, lambda sc: {"steps": 3}, None)
    )
    rebind(monkeypatch, trials.config, "IMAGE_SAMPLER_NAMES", (*IMAGE_SAMPLER_NAMES, "sketch"))

    # The config: sample.sampler may name it, and "both" (every sampler) includes it.
    cfg = TrialConfig.from_dict({"sample": {"sampler": "sketch", "n_images": 4}})
    assert cfg.sample.samplers() == ("sketch",)
    assert "sketch" in dataclasses.replace(cfg.sample, sampler="both").samplers()
    # sample.py --sampler
    assert sample.parse_args(["--checkpoint", "c.pt", "--sampler", "sketch", "--out", "o.png"]).sampler == "sketch"
    # sample.py --steps follows the entry's steps_setting: None refuses it in one line.
    argv = [
        "--checkpoint",
        str(tmp_path / "c.pt"),
        "--sampler",
        "sketch",
        "--steps",
        "5",
        "--out",
        str(tmp_path / "o.png"),
    ]
    assert sample.main(argv) == 2
    assert (
        capsys.readouterr().err
        == "sample.py: error: --steps does not apply to --sampler sketch: it chooses its own steps\n"
    )

    # The full run's end-of-run grid, and the MLflow metrics named after it.
    trainer = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), sde=make_sde(cfg.sde))
    grid = draw_samples(trainer, lambda x, t: x, "sketch", tmp_path / grid_file("sketch"), log=lambda line: None)
    assert grid["nfe"] == 3 and grid["steps"] == 3 and (tmp_path / "samples_sketch.png").is_file()
    metrics = {
        "test_bpd": {"mean": 1.0, "stderr": 0.1, "nfe": 50, "seconds": 2.0, "fidelity": {"n_images": 8}},
        "train": {"final_train_loss": 0.5, "val_dsm": 0.5, "steps": 20, "seconds": 9.0},
        "samples": {"sketch": grid},
    }
    assert {"sketch_nfe": 3.0, "sketch_seconds": grid["seconds"]}.items() <= full_run_metrics(metrics).items()


# ---- an SDE: a subclass, its name in trials.sde.SDES and in trials.config.SDE_KINDS ---------------------------
def test_a_new_sde_is_a_subclass_and_its_name_in_the_two_tables(monkeypatch):
    from trials.sde import SDES, VPSDE, make_sde

    assert set(SDES) == set(SDE_KINDS)

    class SteepVPSDE(VPSDE):
        pass

    monkeypatch.setitem(SDES, "steep", SteepVPSDE)
    rebind(monkeypatch, trials.config, "SDE_KINDS", (*SDE_KINDS, "steep"))
    cfg = TrialConfig.from_dict({"sde": {"kind": "steep"}})
    assert type(make_sde(cfg.sde)) is SteepVPSDE


# ---- a dataset: a row of trials.datasets.DATASETS and a reader in trials/data.py --------------------------------
def test_every_dataset_row_has_a_reader():
    assert set(trials.data._READERS) == set(DATASETS)


def test_a_new_dataset_is_a_row_and_a_reader(monkeypatch):
    import torch

    import train
    import tune

    row = Dataset("noise-20", 1, 28, 4, has_test_split=False, needs_root=False, about="20 images of noise")
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 2
    monkeypatch.setitem(DATASETS, "noise-20", row)
    monkeypatch.setitem(trials.data._READERS, "noise-20", lambda cfg: ((images, labels), None))

    cfg = TrialConfig.from_dict({"data": {"name": "noise-20"}})
    assert cfg.dataset is row
    splits = trials.data.load_data(cfg.data)
    assert len(splits.train) == 16 and len(splits.val) == 4 and splits.test_is_val
    assert tune.parse_args(["--space", "s.yaml", "--data", "noise-20"]).data == "noise-20"
    assert train.parse_args(["--config", "c.yaml", "--data", "noise-20"]).data == "noise-20"


# ---- every entry gives what its readers read ------------------------------------------------------------------
ENTRY_TYPES = {"SCHEDULERS": Scheduler, "SEARCH_ALGORITHMS": SearchAlgorithm, "DATASETS": Dataset}


def entry_table(node: ast.AST, tables: set[str], aliases: dict[str, str]) -> str | None:
    """The table whose entry `node` is: `TABLE[name]`, a name bound to an entry, or a config's `.dataset` row."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in tables:
        return node.value.id
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute) and node.attr == "dataset" and "DATASETS" in tables:
        return "DATASETS"
    return None


def entry_reads(tables: set[str]) -> dict[str, set[str]]:
    """The attributes the product code reads off an entry of each table: `TABLE[name].attr`, or through a name
    bound to an entry (`x = TABLE[name]`, `for x in TABLE.values()`); a dataset row also as `<config>.dataset`."""
    reads: dict[str, set[str]] = {t: set() for t in tables}
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Subscript):
                if table := entry_table(node.value, tables, aliases):
                    aliases.update({target.id: table for target in node.targets if isinstance(target, ast.Name)})
            if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
                it = node.iter
                if (
                    isinstance(it, ast.Call)
                    and isinstance(it.func, ast.Attribute)
                    and it.func.attr == "values"
                    and isinstance(it.func.value, ast.Name)
                    and it.func.value.id in tables
                ):
                    aliases[node.target.id] = it.func.value.id
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (table := entry_table(node.value, tables, aliases)):
                reads[table].add(node.attr)
    return reads


def test_every_entry_gives_every_field_its_readers_read():
    from trials.sampling import IMAGE_SAMPLERS, Sampler

    types = {**ENTRY_TYPES, "IMAGE_SAMPLERS": Sampler}
    reads = entry_reads(set(types))
    assert {"expected_steps", "about", "rungs", "stopping_rule", "build"} <= reads["SCHEDULERS"]  # the scan works
    for table, cls in types.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # No field has a default, so an entry that leaves one out fails where the table is built.
        assert all(
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields.values()
        )
        unknown = reads[table] - set(fields) - {m for m in dir(cls) if not m.startswith("_")}
        assert not unknown, f"code reads {sorted(unknown)} off {table} entries, which {cls.__name__} does not have"
    entries = {"SCHEDULERS": SCHEDULERS, "SEARCH_ALGORITHMS": SEARCH_ALGORITHMS, "IMAGE_SAMPLERS": IMAGE_SAMPLERS}
    for table, entries_of in entries.items():
        for name, entry in entries_of.items():
            assert entry.name == name and entry.about, f"{table}[{name!r}]"


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("full, grace, eta", [(20, 10, 2), (160, 40, 4), (6000, 1000, 3)])
def test_every_scheduler_answers_what_the_estimate_and_the_report_ask(name, full, grace, eta):
    entry = SCHEDULERS[name]
    rungs = entry.rungs(full, grace, eta)
    assert rungs == sorted(set(rungs)) and all(grace <= r < full for r in rungs)
    assert 0 < entry.expected_steps(full, grace, eta) <= full
    assert isinstance(entry.stopping_rule(grace, eta), str) and entry.stopping_rule(grace, eta)


# ---- no second place: nothing outside the tables compares with an entry's name -----------------------------------
# The statements that are the places the page names (a table's keys, or the list a config check reads).
TABLE_STATEMENTS = {
    ("trials/config.py", "SDE_KINDS"),
    ("trials/config.py", "IMAGE_SAMPLER_NAMES"),
    ("trials/sde.py", "SDES"),
    ("trials/data.py", "_READERS"),
}
# Comparisons that are not about which entries exist, each with why (none today).
KNOWN: set[tuple[str, str, str]] = set()


def entry_names() -> dict[str, str]:
    tables = {
        "scheduler": SCHEDULERS,
        "search algorithm": SEARCH_ALGORITHMS,
        "image sampler": IMAGE_SAMPLER_NAMES,
        "SDE": SDE_KINDS,
        "dataset": DATASETS,
    }
    return {name: kind for kind, names in tables.items() for name in names}


def literal_names(node: ast.AST, names: dict[str, str]) -> list[ast.Constant]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node] if node.value in names else []
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for element in node.elts for n in literal_names(element, names)]
    return []


def name_uses(tree: ast.Module, names: dict[str, str]) -> list[tuple[str, int, str]]:
    """(top-level statement, line, name) for every entry name compared with (==, !=, in, is, match) or listed
    (a dict key, a tuple, list or set of names) outside a table. Selecting one entry by name
    (`IMAGE_SAMPLERS["ode"]`, a default value) is not a second place and is not reported."""
    found = []
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            owner = statement.name
        else:
            targets = getattr(statement, "targets", None) or [getattr(statement, "target", None)]
            owner = ",".join(t.id for t in targets if isinstance(t, ast.Name))
        hits: dict[int, ast.Constant] = {}  # by node: a tuple compared with is also a tuple listed
        for node in ast.walk(statement):
            if isinstance(node, ast.Compare):
                for operand in (node.left, *node.comparators):
                    hits.update((id(c), c) for c in literal_names(operand, names))
                    if isinstance(operand, ast.Subscript):
                        hits.update((id(c), c) for c in literal_names(operand.slice, names))
            elif isinstance(node, ast.MatchValue):
                hits.update((id(c), c) for c in literal_names(node.value, names))
            elif isinstance(node, ast.Dict):
                keys = [key for key in node.keys if key is not None]
                hits.update((id(c), c) for key in keys for c in literal_names(key, names))
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                hits.update((id(c), c) for c in literal_names(node, names))
        found += sorted((owner, c.lineno, c.value) for c in hits.values())
    return found


def test_no_module_outside_the_tables_branches_on_an_entry_name():
    names = entry_names()
    tables = {"tuner/search_tables.py", "trials/sampling.py", "trials/datasets.py"}
    found = []
    for path in SOURCES:
        rel = str(path.relative_to(ROOT))
        if rel in tables:
            continue
        for owner, line, name in name_uses(ast.parse(path.read_text()), names):
            if (rel, owner) not in TABLE_STATEMENTS and (rel, owner, name) not in KNOWN:
                found.append(f"{rel}:{line} ({owner}): the {names[name]} {name!r}")
    assert not found, "a new entry would need an edit here too: " + "; ".join(found)


def test_the_scan_finds_a_branch_on_a_name_and_not_a_selection():
    names = {"asha": "scheduler", "ode": "image sampler", "pc": "image sampler"}
    source = (
        "def f(s):\n"
        "    if s.scheduler == 'asha':\n"
        "        return IMAGE_SAMPLERS['ode']\n"
        "    return s.sampler in ('pc',)\n"
        "LABELS = {'asha': 'ASHA'}\n"
        "def g(s, sampler='ode'):\n"
        "    match s:\n"
        "        case 'pc':\n"
        "            return SCHEDULERS['asha'] is s\n"
    )
    assert name_uses(ast.parse(source), names) == [
        ("f", 2, "asha"),
        ("f", 4, "pc"),
        ("LABELS", 5, "asha"),
        ("g", 8, "pc"),
        ("g", 9, "asha"),
    ]
