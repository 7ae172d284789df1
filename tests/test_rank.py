"""Ranking files for an issue (agent/rank.py, agent/rank_terms.py), the expected-recall budget
split (agent/rank_budget.py), and what packing makes of them on real git repositories."""

from __future__ import annotations

import itertools
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent.outline import outline
from agent.pack import pack_repository
from agent.rank import COEFFICIENTS, FEATURES, Corpus, is_source, rank
from agent.rank_budget import DROPPED, FULL, OUTLINED, Option, choose
from agent.rank_history import read_history
from agent import rank_terms
from agent.rank_terms import TermIndex, term_counts, word_terms
from runtime.tokenizer import load_tokenizer


def corpus_of(files: dict[str, str]) -> Corpus:
    """A corpus as the packer builds it: term indexes and outlines of the real texts."""
    paths = sorted(files)
    outlines = {p: outline(p, files[p]) for p in paths}
    return Corpus(paths, [TermIndex.of_text(files[p]) for p in paths], [1000] * len(paths),
                  [is_source(p) for p in paths],
                  {p: o.symbols for p, o in outlines.items() if o}, {p: o.imports for p, o in outlines.items() if o})


def scores_by_path(issue: str, corpus: Corpus) -> dict[str, float]:
    ranking = rank(issue, corpus)
    return dict(zip(corpus.paths, ranking.scores))


def feature(issue: str, corpus: Corpus, path: str, name: str) -> float:
    return float(rank(issue, corpus).features[list(corpus.paths).index(path), FEATURES.index(name)])


def test_term_memos_stay_bounded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(rank_terms, "MEMO_SIZE", 100)
    memo = word_terms.__self__  # type: ignore[attr-defined]
    memo.clear()
    for i in range(250):
        assert word_terms(f"bulkCreate{i}") == (f"bulkcreate{i}", "bulk", "create")
    assert 0 < len(memo) <= 100
    memo.clear()


def test_terms_split_identifiers_and_keep_hyphenated_names():
    assert word_terms("bulk_create") == ("bulk_create", "bulk", "create")
    assert word_terms("QuerySet") == ("queryset", "query", "set")
    assert word_terms("HTTPError") == ("httperror", "http", "error")
    assert word_terms("_request") == ("request",) and word_terms("__init__") == ("init",)
    counts = term_counts('raise Error("not-callable: use --import-mode") # getHTTPResponse2')
    assert counts["not-callable"] == 1 and counts["import-mode"] == 1 and counts["callable"] == 1
    assert counts["gethttpresponse2"] == counts["http"] == counts["response"] == 1
    index = TermIndex.of_text("bulk_create(x); bulk_create(y); Query")
    assert index.length == 7  # bulk_create, bulk, create twice each; query once (one-letter words are none)
    assert TermIndex.decode(index.encode()) == index


SHAPES = {
    "geo/__init__.py": "",
    "geo/area.py": "from geo.units import convert\n\n\ndef polygon_area(points):\n"
                   "    if len(points) < 3:\n        raise ValueError('a polygon needs three points')\n"
                   "    return convert(sum(p[0] for p in points))\n",
    "geo/units.py": "def convert(value, unit='m'):\n    return value * FACTORS[unit]\n\n\nFACTORS = {'m': 1}\n",
    "geo/render.py": "def draw(shape):\n    return str(shape)\n",
    "tests/test_area.py": "from geo.area import polygon_area\n\n\ndef test_triangle():\n"
                          "    assert polygon_area([(0, 0), (1, 0), (0, 1)])\n",
    "docs/area.md": "# Area\n\nA polygon needs three points; polygon area of a triangle.\n",
}


def test_the_file_raising_the_message_ranks_first_without_being_named():
    corpus = corpus_of(SHAPES)
    issue = "Crash: 'a polygon needs three points' for a triangle given as two points"
    scores = scores_by_path(issue, corpus)
    assert max(scores, key=scores.__getitem__) == "geo/area.py"
    # The docs and the test say the same words, but fixes are in source code.
    assert scores["geo/area.py"] > scores["docs/area.md"] and scores["geo/area.py"] > scores["tests/test_area.py"]
    explained = rank(issue, corpus).explain(list(corpus.paths).index("geo/area.py"))
    assert explained.startswith("score ") and "lexical +" in explained and "polygon" in explained


def test_features_from_the_graph_names_and_paths():
    corpus = corpus_of(SHAPES)
    issue = "polygon_area gives wrong results"
    # geo/units.py shares no word with the issue: what makes it relevant is that area.py imports it.
    importer = feature(issue, corpus, "geo/area.py", "lexical")
    assert feature(issue, corpus, "geo/units.py", "lexical") == 0 < importer
    assert feature(issue, corpus, "geo/units.py", "imported_by") == importer
    assert feature(issue, corpus, "geo/render.py", "imported_by") == 0.0
    assert feature(issue, corpus, "geo/area.py", "tests") > 0  # tests/test_area.py imports it and matches
    assert feature(issue, corpus, "geo/area.py", "defines") == 1.0
    assert feature(issue, corpus, "geo/area.py", "path") > 0 and feature(issue, corpus, "geo/units.py", "path") == 0
    assert feature("see geo/render.py", corpus, "geo/render.py", "named") == 1.0
    named = scores_by_path("see geo/render.py", corpus)
    assert max(named, key=named.__getitem__) == "geo/render.py"
    explained = rank(issue, corpus).explain(list(corpus.paths).index("geo/units.py"))
    assert "imported_by +" in explained and "(geo/area.py)" in explained


def test_scores_do_not_depend_on_the_order_of_the_files():
    files = dict(SHAPES)
    corpus = corpus_of(files)
    issue = "polygon_area crashes: a polygon needs three points"
    expected = scores_by_path(issue, corpus)
    shuffled = list(corpus.paths)
    random.Random(1).shuffle(shuffled)
    permuted = Corpus(shuffled, [corpus.terms[list(corpus.paths).index(p)] for p in shuffled], [1000] * len(shuffled),
                      [is_source(p) for p in shuffled], corpus.symbols, corpus.imports)
    assert scores_by_path(issue, permuted) == pytest.approx(expected)
    assert scores_by_path(issue, corpus) == expected  # deterministic


def test_no_issue_ranks_by_kind_and_size():
    ranking = rank(None, corpus_of(SHAPES))
    by_path = dict(zip(ranking.paths, ranking.scores))
    assert by_path["geo/render.py"] > by_path["tests/test_area.py"] and by_path["geo/render.py"] > by_path["docs/area.md"]
    assert ranking.probability.sum() == pytest.approx(1.0)


def brute_force(options: list[Option], budget: int) -> float:
    best = 0.0
    for modes in itertools.product((DROPPED, OUTLINED, FULL), repeat=len(options)):
        cost = value = 0.0
        for o, m in zip(options, modes):
            if m == FULL:
                cost, value = cost + o.full_cost, value + o.full_value
            elif m == OUTLINED:
                if o.outline_cost is None:
                    break
                cost, value = cost + o.outline_cost, value + o.outline_value
        else:
            if cost <= budget:
                best = max(best, value)
    return best


def test_choose_is_the_best_split_within_the_budget():
    rng = random.Random(7)
    for _ in range(40):
        options = []
        for _ in range(rng.randint(1, 6)):
            full = rng.randint(1, 60)
            value = rng.random()
            has_outline = rng.random() < 0.7
            options.append(Option(value, full, value / 4, rng.randint(1, full) if has_outline else None))
        budget = rng.randint(1, 150)
        modes = choose(options, budget)
        cost = sum(o.full_cost if m == FULL else (o.outline_cost or 0) if m == OUTLINED else 0
                   for o, m in zip(options, modes))
        value = sum(o.full_value if m == FULL else o.outline_value if m == OUTLINED else 0
                    for o, m in zip(options, modes))
        assert cost <= budget and all(m != OUTLINED or o.outline_cost is not None for o, m in zip(options, modes))
        assert value == pytest.approx(brute_force(options, budget))  # budgets under SLOTS: exact


def test_a_likely_large_file_beats_many_unlikely_outlines():
    options = [Option(0.5, 900, 0.125, 100)] + [Option(0.01, 200, 0.0025, 20) for _ in range(40)]
    modes = choose(options, 1000)
    assert modes[0] == FULL and modes.count(OUTLINED) == 5  # the 100 tokens left buy five outlines


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_pack_puts_the_relevant_file_in_full_at_a_small_budget(tmp_path: Path, tokenizer):
    """Twenty modules of about the same size, one of them raising the message the issue
    quotes: at a budget a little over that one file, it is packed in full and outlines of
    the others do not crowd it out."""
    root = tmp_path / "repo"
    root.mkdir()
    filler = "".join(f"    total = total * {k} + {k}  # step {k}\n" for k in range(40))
    for i in range(20):
        message = "    raise ValueError('the ledger is out of balance')\n" if i == 13 else ""
        text = f'"""Module {i}."""\n\n\ndef run_{i}(total):\n{filler}{message}    return total\n'
        (root / "pkg").mkdir(exist_ok=True)
        (root / "pkg" / f"mod{i:02d}.py").write_text(text)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    cache = tmp_path / "cache"
    whole = pack_repository(root, tokenizer=tokenizer, cache_dir=cache)
    one = next(f for f in whole.files if f.path == "pkg/mod13.py").tokens
    issue = "Saving fails with 'the ledger is out of balance' though the ledger balances"
    result = pack_repository(root, budget=one + 200, issue=issue, tokenizer=tokenizer, cache_dir=cache)
    modes = {f.path: f.mode for f in result.files}
    assert modes["pkg/mod13.py"] == "full" and result.total_tokens <= one + 200
    assert "outlined" in modes.values()  # what is left buys outlines of the rest
    assert result.stats.indexed == 20
    assert "ledger" in result.explain("pkg/mod13.py") and "lexical +" in result.explain("pkg/mod13.py")
    again = pack_repository(root, budget=one + 200, issue=issue, tokenizer=tokenizer, cache_dir=cache)
    assert again.stats.indexed == 0 and again.files == result.files and again.ids() == result.ids()
    # The prompt's order is the path order whatever the scores: the prefix cache stays warm.
    packed = [f.path for f in result.files if f.mode != "dropped"]
    assert packed == sorted(packed)
    assert np.isclose(sum(f.relevance for f in result.files), 1.0)


def test_pack_explain_says_why_each_full_file_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import json

    import typer
    from typer.testing import CliRunner

    from agent.cli.pack import pack_cmd

    app = typer.Typer()
    app.command("pack")(pack_cmd)
    app.callback()(lambda: None)
    monkeypatch.setenv("V4AGENT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "repo"
    for path, text in SHAPES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    (root / "geo" / "big.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i} - {i}\n\n" for i in range(60)))
    git(root, "init", "-q")
    issue = "polygon needs three points: raised for a triangle"
    report = CliRunner().invoke(app, ["pack", str(root), "--budget", "300", "--issue", issue, "--explain"])
    assert report.exit_code == 0, report.output
    why = report.stdout.split("\nwhy in full", 1)[1].splitlines()[1:]
    assert why and why[0].startswith("  geo/area.py: score ") and "lexical +" in why[0] and "polygon" in why[0]
    full = [line for line in report.stdout.split("\nfull:", 1)[1].split("\noutlined:")[0].splitlines()[1:] if line]
    assert len(why) == len(full)  # each full file, none else
    data = json.loads(CliRunner().invoke(app, ["pack", str(root), "--budget", "300", "--issue", issue, "--explain",
                                               "--json"]).stdout)
    assert all(("why" in f) == (f["mode"] == "full") for f in data["files"])
    whole = CliRunner().invoke(app, ["pack", str(root), "--issue", issue, "--explain"]).stdout
    assert whole.endswith("why in full: the whole repository fits in the budget, nothing was ranked\n")


def test_the_weight_fit_recovers_known_weights():
    """agent/data/fit_rank_weights.py on cases drawn from a known conditional logit."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fit_rank_weights",
                                                  Path(__file__).parents[1] / "agent/data/fit_rank_weights.py")
    assert spec is not None and spec.loader is not None
    fitting = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fitting)
    rng = np.random.default_rng(3)
    truth = np.array([3.0, -2.0, 0.5])
    data = []
    for _ in range(400):
        x = rng.normal(size=(30, 3))
        p = np.exp(x @ truth)
        data.append((x, [int(rng.choice(30, p=p / p.sum()))]))
    w = fitting.fit(data, l2=0.1)
    assert np.allclose(w, truth, atol=0.35)
    assert fitting.log_likelihood(data, w) > fitting.log_likelihood(data, np.zeros(3)) + 1.0


def commit_files(root: Path, message: str, files: dict[str, str]) -> None:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", message)


def history_repo(root: Path) -> Path:
    """pkg/core.py changes together with pkg/partner.py, pkg/other.py always alone and as
    recently; none of them shares a word with the issue but core.py's path."""
    root.mkdir()
    git(root, "init", "-q")
    bodies = {name: "".join(f"def {name}_{i}(x):\n    return x + {i}\n\n" for i in range(30))
              for name in ("core", "partner", "other", "spare")}
    commit_files(root, "start", {f"pkg/{name}.py": body for name, body in bodies.items()})
    for round_ in range(3):
        commit_files(root, f"core and partner {round_}", {"pkg/core.py": bodies["core"] + f"# {round_}\n",
                                                          "pkg/partner.py": bodies["partner"] + f"# {round_}\n"})
        commit_files(root, f"other {round_}", {"pkg/other.py": bodies["other"] + f"# {round_}\n"})
    return root


def test_co_change_lifts_the_file_that_changes_with_the_named_one(tmp_path: Path, tokenizer):
    root = history_repo(tmp_path / "repo")
    issue = "Crash when loading: see pkg/core.py"
    result = pack_repository(root, budget=1, issue=issue, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    ranking = result.ranking
    assert ranking is not None
    by_path = {p: i for i, p in enumerate(ranking.paths)}
    cochange = ranking.features[:, FEATURES.index("cochange")]
    recency = ranking.features[:, FEATURES.index("recency")]
    # partner.py: three commits with core.py alone, and the first commit shared by all four.
    assert cochange[by_path["pkg/partner.py"]] == 1.0 and cochange[by_path["pkg/other.py"]] == pytest.approx(0.1)
    assert recency[by_path["pkg/other.py"]] == 1.0 > recency[by_path["pkg/partner.py"]] > recency[by_path["pkg/spare.py"]] > 0
    # Other changed last, yet the file that changes with the named one ranks above it.
    assert ranking.scores[by_path["pkg/partner.py"]] > ranking.scores[by_path["pkg/other.py"]]
    weight = dict(zip(FEATURES, COEFFICIENTS))
    assert f"cochange {weight['cochange']:+.2f} (with pkg/core.py in 4 commits)" in result.explain("pkg/partner.py")
    assert f"recency {weight['recency']:+.2f} (changed in the last commit)" in result.explain("pkg/other.py")
    assert "recency" in result.explain("pkg/partner.py") and "(changed 1 commit back)" in result.explain("pkg/partner.py")
    # Deterministic, and the history is read once per HEAD: a new commit is seen at once.
    again = pack_repository(root, budget=1, issue=issue, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert again.ranking is not None and np.array_equal(again.ranking.scores, ranking.scores)
    commit_files(root, "spare", {"pkg/spare.py": "def spare():\n    return 0\n"})
    moved = pack_repository(root, budget=1, issue=issue, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
    assert moved.ranking is not None
    assert moved.ranking.features[by_path["pkg/spare.py"], FEATURES.index("recency")] == 1.0


def test_without_history_the_history_features_are_zero(tmp_path: Path, tokenizer):
    """No commit yet, and a shallow clone: packing works, recency and co-change are 0, and the
    scores are those of the other features."""
    source = history_repo(tmp_path / "repo")
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", source.as_uri(), str(shallow))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    git(fresh, "init", "-q")
    for name in ("core", "partner", "other"):
        (fresh / "pkg").mkdir(exist_ok=True)
        (fresh / "pkg" / f"{name}.py").write_text((source / "pkg" / f"{name}.py").read_text())
    issue = "Crash when loading: see pkg/core.py"
    for root in (shallow, fresh):
        result = pack_repository(root, budget=1, issue=issue, tokenizer=tokenizer, cache_dir=tmp_path / "cache")
        ranking = result.ranking
        assert ranking is not None and ranking.paths
        history = [FEATURES.index(name) for name in ("cochange", "recency")]
        assert not ranking.features[:, history].any()
        assert "cochange" not in result.explain("pkg/partner.py")
    assert read_history(shallow, shallow / ".git", git_out(shallow, "rev-parse", "HEAD")) is None
    full = read_history(source, source / ".git", git_out(source, "rev-parse", "HEAD"))
    assert full is not None and len(full.commits) == 7 and full.commits[0] == ("pkg/other.py",)


def git_out(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()
