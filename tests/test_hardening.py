"""Bad stores, concurrent invocations, caches, downloads, report and suite
edge cases: each defect found on the old host, one test each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_SUITE, run_cli, write
from dabench.store import RunStore, StoreError

# ---------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def _one_run_store(tmp_path_factory) -> Path:
    """A results folder holding one run, computed once for this module's tests (each gets a copy)."""
    base = tmp_path_factory.mktemp("one-run")
    suite = write(base / "s.toml", TINY_SUITE.replace("seeds = 2", "seeds = 1"))
    r = run_cli("run", str(suite), "--results", str(base / "res"), "--device", "cpu", "--methods", "source-only")
    assert r.returncode == 0, r.stderr
    return base


@pytest.fixture
def tiny_store(_one_run_store, tmp_path) -> Path:
    """A copy of the one-run results folder as ``tmp_path / "res"``, its suite as ``tmp_path / "s.toml"``."""
    import shutil

    shutil.copy(_one_run_store / "s.toml", tmp_path / "s.toml")
    return Path(shutil.copytree(_one_run_store / "res", tmp_path / "res"))


@contextmanager
def _read_only(folder: Path):
    """``folder`` on a read-only mount (a bind mount remounted ro, where the
    system lets us), else made read-only by permissions for a non-root user."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.iterdir()]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    ok = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(folder)], capture_output=True)
        ok = False
    if not ok:
        pytest.skip("cannot make a read-only folder here (root without mount rights)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_reports_read_a_store_on_a_read_only_mount_and_never_write_it(tmp_path, tiny_store):
    res = tiny_store
    for p in res.glob("runs.sqlite-*"):
        p.unlink()  # as left by a clean shutdown
    before = (res / "runs.sqlite").read_bytes()
    with _read_only(res):
        with pytest.raises(OSError):
            (res / "probe").write_text("x")
        for fmt in ("md", "json"):
            r = run_cli("leaderboard", str(res), "--format", fmt)
            assert r.returncode == 0, r.stderr
        assert "source-only" in r.stdout
        run = run_cli("run", str(tmp_path / "s.toml"), "--results", str(res), "--device", "cpu")
        assert run.returncode == 2 and "Traceback" not in run.stderr
    assert (res / "runs.sqlite").read_bytes() == before


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_gives_one_clear_error(tmp_path, damage, tiny_store):
    res = tiny_store
    db = res / "runs.sqlite"
    for p in res.glob("runs.sqlite-*"):
        p.unlink()
    data = db.read_bytes()
    db.write_bytes(os.urandom(len(data)) if damage == "garbage" else data[: 4096 + 100])
    for args in (["leaderboard", str(res)], ["run", str(tmp_path / "s.toml"), "--results", str(res)]):
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert str(db) in r.stderr and ".recover" in r.stderr and "backup" in r.stderr


def test_a_full_disk_says_so_and_keeps_what_was_stored(tmp_path):
    st = RunStore(tmp_path / "res")
    rec = _record("k0", "ok")
    st.write(rec)
    st._con.execute(f"PRAGMA max_page_count = {st._con.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(StoreError, match="full") as e:
        for i in range(1, 200):
            st.write(_record(f"k{i}", "ok", reason="x" * 4000))
    assert "rollback" not in str(e.value)
    assert st.statuses()["k0"] == "ok"
    st.close()


def _record(key: str, status: str, reason: str | None = None) -> dict:
    return {"key": key, "suite": "s", "pair": "a:b", "method": "m", "method_version": "1", "family": "x",
            "reference": 0, "params": "{}", "point": 0, "seed": 0, "protocol": "{}", "budget": "{}",
            "backbone": "default", "status": status, "reason": reason, "target_acc": 0.5 if status == "ok" else None}


def test_an_ok_row_is_never_overwritten(tmp_path):
    with RunStore(tmp_path / "res") as st:
        assert st.write(_record("k", "failed", "boom"))
        assert st.write(_record("k", "ok"))  # a failed row is replaced (--retry-failed)
        assert not st.write(_record("k", "failed", "late"))  # an ok one is not, by a failure
        assert not st.write(_record("k", "skipped", "late"))  # nor by a skip
        assert st.statuses() == {"k": "ok"} and st.rows()[0]["reason"] is None
        assert st.write(_record("k2", "skipped", "why"))
        assert not st.write(_record("k2", "failed", "late")) and st.statuses()["k2"] == "skipped"


def test_leases_share_runs_between_invocations_and_expire_with_their_owner(tmp_path):
    a, b = RunStore(tmp_path / "res"), RunStore(tmp_path / "res")
    assert a.claim("k").state == "claimed"
    held = b.claim("k")
    assert held.state == "held" and held.lease.pid == os.getpid()
    assert a.claim("k").state == "claimed"  # an owner may take its own lease again
    a.write(_record("k", "ok"))
    assert b.claim("k").state == "done"
    # a lease whose owner process is gone is free again
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    with a.transaction() as con:
        con.execute("INSERT INTO leases VALUES ('k2', 'other', ?, ?, NULL, ?)", (pid, os.uname().nodename, time.time()))
    assert b.claim("k2").state == "claimed"
    # ... and so is a lease from another host whose heartbeat stopped
    with a.transaction() as con:
        con.execute("INSERT INTO leases VALUES ('k3', 'other', 1, 'elsewhere', NULL, ?)", (time.time() - 3600,))
        con.execute("INSERT INTO leases VALUES ('k4', 'other', 1, 'elsewhere', NULL, ?)", (time.time(),))
    assert b.claim("k3").state == "claimed" and b.claim("k4").state == "held"
    a.close()
    b.close()


SLOW = """
import json, os, time
import numpy as np
from dabench import Method, hookimpl

LOG = {log!r}
HELLO = LOG + ".hello"


class _Uniform:
    def __init__(self, k):
        self.k = k
    def predict_proba(self, X, domain="target"):
        return np.full((len(X), self.k), 1.0 / self.k)
    def embed(self, X, domain="target"):
        return np.asarray(X)


class Slow(Method):
    '''Waits until both invocations are computing a run, so they surely overlap.'''
    name = "slow"
    def fit(self, task):
        with open(HELLO, "a") as f:
            f.write(f"{{os.getppid()}}\\n")
        deadline = time.time() + 120
        while len(set(open(HELLO).read().split())) < 2 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        with open(LOG, "a") as f:
            f.write(json.dumps({{"seed": task.seed, "pid": os.getppid()}}) + "\\n")
        return _Uniform(task.n_classes)


@hookimpl
def dabench_methods(register):
    register(Slow)
"""


def test_two_invocations_on_one_store_never_compute_a_run_twice(tmp_path):
    log = tmp_path / "slow.jsonl"
    pdir = write(tmp_path / "p" / "slow.py", SLOW.format(log=str(log))).parent
    suite = write(tmp_path / "s.toml", TINY_SUITE.replace("seeds = 2", "seeds = 8").replace(
        "[methods.source-only]\n[methods.dann]", "[methods.slow]"))
    cmd = [sys.executable, "-m", "dabench", "run", str(suite), "--results", str(tmp_path / "res"),
           "--plugins-dir", str(pdir), "--device", "cpu"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    runs = [json.loads(x) for x in log.read_text().splitlines()]
    seeds = sorted(r["seed"] for r in runs)
    assert seeds == list(range(8)), f"a run was computed twice or not at all: {seeds}"
    with RunStore.open_readonly(tmp_path / "res") as st:
        assert st.count() == 8 and {r["status"] for r in st.rows()} == {"ok"}
    assert len({r["pid"] for r in runs}) == 2, "both invocations should have shared the work"
    assert any("another dabench run" in o[1] for o in outs)  # one of them waited for, or counted, the other's runs


# ---------------------------------------------------------------- caches


def _write_entry_many(cache: str, n: int) -> None:
    from dabench.data.features import FeatureExtractor, write_entry

    ex = FeatureExtractor("fx", "w", "p", 4, build=lambda: None)
    X = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    for _ in range(n):
        write_entry(Path(cache), "dom", ex, "k" * 64, {"a": 1}, X, np.zeros(1000, dtype=np.int64))


def test_concurrent_feature_cache_writes_of_one_entry_all_succeed(tmp_path):
    from dabench.data.features import FeatureExtractor, read_entry

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_hardening import _write_entry_many; _write_entry_many({str(tmp_path)!r}, 10)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    ex = FeatureExtractor("fx", "w", "p", 4, build=lambda: None)
    X, y = read_entry(tmp_path, "dom", ex, "k" * 64, 1000)
    assert X.shape == (1000, 4) and X[-1, -1] == 3999
    assert not [p for p in (tmp_path / "dom@fx").iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------- downloads


def test_http_mirror_is_refused_for_unhashed_files_unless_allowed_or_pinned(mirror, monkeypatch, tmp_path):
    from test_standard_data import publish, tar_gz

    import dabench.data.download as dl
    from dabench.data.core import DataError

    root = tmp_path / "data"
    files = {"train.tar": tar_gz({"train/image_list.txt": b""}),
             "validation.tar": tar_gz({"validation/image_list.txt": b""})}
    publish(mirror, monkeypatch, "visda2017", files, pin=False)
    monkeypatch.delenv("DABENCH_ALLOW_HTTP")
    with pytest.raises(DataError, match="refused: plain http") as e:
        dl.download("visda2017", root)
    assert "DABENCH_ALLOW_HTTP=1" in str(e.value)
    assert not (root / "visda2017" / "SHA256SUMS").exists()  # nothing was pinned
    # pinned from a trusted source first: the http download is checked against the pin
    import hashlib

    (root / "visda2017").mkdir(parents=True, exist_ok=True)
    (root / "visda2017" / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in files.items()))
    assert {s.state for s in dl.download("visda2017", root)} == {"pinned"}
    # the upstream URLs are https first
    assert all(f.urls[0].startswith("https://") for f in dl.DATASETS["visda2017"].files)
    assert all(u.startswith("https://") or f.sha256 or f.md5
               for d in dl.DATASETS.values() for f in d.files for u in f.urls[:1])


def test_an_archive_cannot_rewrite_pins_or_markers(mirror, monkeypatch, tmp_path):
    from test_standard_data import publish, tar_gz

    import dabench.data.download as dl

    root = tmp_path / "data"
    fake_pins = b"0" * 64 + b"  validation.tar\n"
    fake_marker = json.dumps({"archive": "validation.tar", "sha256": "0" * 64}).encode()
    files = {"train.tar": tar_gz({"train/image_list.txt": b"", "SHA256SUMS": fake_pins,
                                  ".validation.tar.extracted": fake_marker}),
             "validation.tar": tar_gz({"validation/image_list.txt": b""})}
    publish(mirror, monkeypatch, "visda2017", files, pin=False)  # trust on first use (DABENCH_ALLOW_HTTP=1)
    dl.download("visda2017", root)
    folder = root / "visda2017"
    import hashlib

    assert dl.read_pins(folder)["validation.tar"] == hashlib.sha256(files["validation.tar"]).hexdigest()
    marker = json.loads((folder / ".validation.tar.extracted").read_text())
    assert marker["sha256"] == hashlib.sha256(files["validation.tar"]).hexdigest()
    assert {s.state for s in dl.verify("visda2017", root)} == {"pinned"}


from test_standard_data import mirror  # noqa: E402,F401 - the loopback mirror fixture


def test_requires_python_matches_the_extraction_code():
    import tomllib

    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    # tarfile's extraction filters (filter="data") arrived in 3.11.4
    assert spec.replace(" ", "") == ">=3.11.4"
    assert hasattr(tarfile, "data_filter")


# ---------------------------------------------------------------- reports and suites


def test_a_dollar_in_a_method_name_does_not_break_the_html_report():
    from dabench.leaderboard import compute_leaderboard, to_html
    from dabench.store import canonical_json

    rows = [{"key": f"{m}{s}", "suite": "s", "pair": "a:b", "method": m, "point": 0, "seed": s, "status": "ok",
             "params": canonical_json({}), "target_acc": 0.5 + 0.1 * s + (0.1 if m != "source-only" else 0),
             "source_acc": 0.9, "family": "x", "protocol": canonical_json({"k_target": 0})}
            for m in ("source-only", "cost$1$", "bad$\\frac$") for s in range(3)]
    page = to_html(compute_leaderboard(rows))  # matplotlib's math text would fail on "$\frac$"
    assert "cost$1$" in page and "bad$\\frac$" in page and "gain-heatmap" in page and "rank-plot" in page


def test_suite_expansion_is_linear_capped_and_range_checked(registry, tmp_path, monkeypatch):
    import dabench.suite as suite_mod
    from dabench.suite import MAX_POINTS, SuiteError, parse_suite

    calls = []
    real = suite_mod.canonical_json
    monkeypatch.setattr(suite_mod, "canonical_json", lambda o: calls.append(1) or real(o))
    n = 1000
    grid = ", ".join(f"{0.001 + i * 9e-5:.6f}" for i in range(n))
    base = 'name = "g"\nseeds = 1\npairs = ["moons:moons-rot35"]\n'
    s = parse_suite(write(tmp_path / "g.toml", base + f"[methods.dann]\ngrid = {{ lr = [{grid}] }}\n"), registry)
    assert len(s.methods[0].points) == n
    assert len(calls) <= 2 * n, f"{len(calls)} canonical_json calls for {n} points: not linear"

    def bad(text: str, key: str, says: str) -> None:
        with pytest.raises(SuiteError) as e:
            parse_suite(write(tmp_path / "b.toml", text), registry)
        assert e.value.key == key and says in str(e.value), str(e.value)

    big = ", ".join(str(i) for i in range(101))
    bad(base + f"[methods.dann]\ngrid = {{ lr = [{big}], lambda_max = [{big}] }}\n", "methods.dann.grid",
        f"more than the {MAX_POINTS}")
    bad(base.replace("seeds = 1", "seeds = 1000000") + "[methods.dann]\n", "seeds", "more than the 1000")
    bad(base.replace("seeds = 1", f"seeds = [0, {2**70}]") + "[methods.dann]\n", "seeds", "out of range")
    bad(base.replace('name = "g"', 'name = "a\\u0000b"') + "[methods.dann]\n", "name", "control character")
    bad(base + '[budget]\nsteps = 10000000000\n[methods.dann]\n', "budget.steps", "at most")
    bad(base + '[methods.dann]\nrandom = { n = 2, seed = -1 }\n', "methods.dann.random.seed", "[0, ")
    r = run_cli("run", str(write(tmp_path / "nul.toml", base.replace('name = "g"', 'name = "a\\u0000b"')
                                 + "[methods.dann]\n")), "--results", str(tmp_path / "r"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "control character" in r.stderr
