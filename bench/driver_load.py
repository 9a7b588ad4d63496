"""Load on the tuning driver: many trials at once through the real driver, with only the training replayed.

    python bench/driver_load.py [--trials 1000] [--concurrent 64] [--scale 0.05] [--modes off,postgres,slow]
    python bench/driver_load.py --tiny [--delay 0.3]

The search is `tuner.driver.run` as `tune.py` runs it: the space's searcher (TPE) and scheduler (ASHA), the
MLflow callback, the outbox, the re-scoring, the export and the report, on a one-machine Ray cluster that
declares `--concurrent` CPUs. Only the training is replaced: a stand-in trial (handed to the driver, not a
flag of tune.py) snaps its config to the recorded grid of bench/data/cpu_curves.csv, as the replay does, and
reports that config's recorded rungs, each after sleeping its recorded training and scoring seconds times
`--scale`, with a checkpoint, so the searcher and the scheduler decide on real curves. (The checkpoints hold no
model: re-scoring them fails, as a lost checkpoint would, and the winner is picked on the fast score.)

Modes, each in a driver process of its own: `off` (the MLflow callback does nothing: the search alone),
`postgres` (an MLflow server on PostgreSQL, as in docker/), `slow` (the same server behind a proxy that answers
every request `--delay` seconds late). Printed per mode: the search's wall time and its ratio to `off`, rung
results per second, the report-to-MLflow lag (median and p99, from a rung's record being made in Tune's callback
to the server having it), the longest time Tune's loop spent in the tracking callback, the driver's CPU seconds
and peak RSS, the export and report seconds, and whether every rung Tune recorded reached MLflow exactly once.

`--tiny`: the whole `tune.py` command on search_spaces/tiny.yaml (6 trials, 10 rungs each, FIFO; seeded)
against an MLflow server, then against the same server behind the proxy: wall times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
CURVES = ROOT / "bench" / "data" / "cpu_curves.csv"


# ---- the stand-in trial ---------------------------------------------------------------------------------
def read_curves() -> dict:
    """The recorded grid as plain data (it travels to every worker): lrs, eps and each config's rungs, each rung
    with its own training seconds (as bench/replay.py charges them) and its scores by eps."""
    import pandas as pd

    frame = pd.read_csv(CURVES, dtype={"ch_mult": str})
    curves = {}
    for (lr, batch, blocks, ch_mult), rows in frame.groupby(["lr", "batch_size", "num_res_blocks", "ch_mult"]):
        rungs = []
        for step, at in rows.groupby("step", sort=True):
            first = at.iloc[0]
            rungs.append(
                {
                    "step": int(step),
                    "train_s": float(first.train_seconds),
                    "diverged": bool(first.diverged),
                    "train_loss": float(first.train_loss),
                    "val_dsm": float(first.val_dsm),
                    "by_eps": {
                        repr(float(r.sampling_eps)): (float(r.val_bpd), float(r.eval_seconds)) for r in at.itertuples()
                    },
                }
            )
        curves[_key(lr, batch, blocks, ch_mult)] = rungs
    return {
        "lrs": sorted(float(x) for x in frame.lr.unique()),
        "eps": sorted(float(x) for x in frame.sampling_eps.unique()),
        "curves": curves,
    }


def _key(lr, batch_size, num_res_blocks, ch_mult) -> str:
    return f"{round(float(lr), 12)!r}|{int(batch_size)}|{int(num_res_blocks)}|{ch_mult}"


def make_stand_in(grid: dict, scale: float):
    """A function trainable reporting a recorded curve; a closure, so Ray ships it with the grid by value."""

    def replayed_trial(params, *, space):
        import tempfile as _tempfile

        from ray import tune

        decoded = {hp.name: hp.decode(params[hp.name]) for hp in space.hyperparameters}

        def nearest_log(values, x):
            return min(values, key=lambda v: abs(math.log(v) - math.log(x)))

        key = (
            f"{round(nearest_log(grid['lrs'], decoded['lr']), 12)!r}|{int(decoded['batch_size'])}|"
            f"{int(decoded['num_res_blocks'])}|{','.join(map(str, decoded['ch_mult']))}"
        )
        eps = repr(nearest_log(grid["eps"], decoded.get("sampling_eps", grid["eps"][0])))
        start = time.perf_counter()
        for rung in grid["curves"][key]:
            val_bpd, eval_s = rung["by_eps"][eps]
            time.sleep((rung["train_s"] + eval_s) * scale)
            metrics = {
                "step": rung["step"],
                "train_loss": rung["train_loss"],
                "val_dsm": rung["val_dsm"],
                "val_bpd": math.inf if rung["diverged"] else val_bpd,
                "val_bpd_stderr": 0.0,
                "nfe": 28,
                "eval_seconds": eval_s * scale,
                "images_per_sec": 0.0,
                "precision": "replayed",
                "seconds": time.perf_counter() - start,
                "diverged": rung["diverged"],
                "bpd_failed": False,
                "reason": "",
            }
            with _tempfile.TemporaryDirectory() as folder:
                Path(folder, "trainer.pt").write_bytes(b"replayed: no model")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            if rung["diverged"]:
                return

    return replayed_trial


# ---- one driver process -------------------------------------------------------------------------------
def child(args) -> None:
    from ray import tune

    from tuner import driver, tracking

    stalls, results = [], [0]

    def timed(method, counts_result=False, off=False):
        def wrapper(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return None if off else method(self, *a, **kw)
            finally:
                stalls.append(time.perf_counter() - t0)
                results[0] += counts_result

        return wrapper

    logger = tracking.MlflowTrialLogger
    for name in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"):
        setattr(logger, name, timed(getattr(logger, name), name == "on_trial_result", args.mode == "off"))

    phases = {}

    def phase(label, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0

        return wrapper

    tune.Tuner.fit = phase("search", tune.Tuner.fit)
    driver.write_outputs = phase("export", driver.write_outputs)
    driver.write_report = phase("report", driver.write_report)

    options = driver.TuneOptions(
        space=Path(args.space),
        name=f"load-{args.mode}",
        storage=Path(args.storage),
        address=args.address,
        mlflow_uri=args.mlflow_uri,
    )
    t0 = time.perf_counter()
    status = driver.run(options, stand_in=make_stand_in(read_curves(), args.scale))
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    lags = []
    for tracker in tracking._OPEN.values():
        lags += tracker.outbox.lags_ms
    out = {
        "mode": args.mode,
        "status": status,
        "wall_s": wall,
        **{f"{k}_s": v for k, v in phases.items()},
        "results": results[0],
        "stall_max_ms": 1000 * max(stalls, default=0.0),
        "callback_total_s": sum(stalls),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "lag_median_s": statistics.median(lags) / 1000 if lags else math.nan,
        "lag_p99_s": sorted(lags)[int(0.99 * (len(lags) - 1))] / 1000 if lags else math.nan,
    }
    print("RESULT " + json.dumps(out), flush=True)


# ---- what the parent starts ---------------------------------------------------------------------------
class SlowProxy:
    """An HTTP proxy on 127.0.0.1 that forwards every request to `target` and answers `delay` seconds late."""

    def __init__(self, target: str, delay: float):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = urllib.request.Request(
                    target + self.path,
                    data=body or None,
                    method=self.command,
                    headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")},
                )
                time.sleep(proxy.delay)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, headers, payload = response.status, response.headers, response.read()
                except urllib.error.HTTPError as exc:
                    status, headers, payload = exc.code, exc.headers, exc.read()
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.delay = delay
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """`ray start --head --block` declaring `cpus` CPUs, in a process group of its own (never `ray stop`)."""

    def __init__(self, cpus: int, folder: Path):
        from tests.servers import start

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="vpsde-load-", dir="/tmp"))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env.pop("RAY_ADDRESS", None)
        log = folder / "ray_head.log"
        self.proc = start(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                f"--port={self.port}",
                f"--num-cpus={cpus}",
                "--num-gpus=0",
                "--include-dashboard=false",
                "--object-store-memory=1000000000",
                "--disable-usage-stats",
                f"--temp-dir={self.temp}",
                "--block",
            ],
            log,
            self.env,
        )
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text()[-2000:]}")
            time.sleep(1)

    def stop(self):
        from tests.servers import stop

        stop(self.proc, grace_s=40)
        shutil.rmtree(self.temp, ignore_errors=True)


def write_space(folder: Path, trials: int, concurrent: int) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "cpu.yaml").read_text())
    raw["name"] = "load"
    raw["search"].update(num_samples=trials, max_concurrent=concurrent, time_budget_s=None, top_k=3, seed=0)
    path = folder / "load.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def arrived_once(uri: str, experiment_dir: Path) -> str:
    """Whether every rung Tune recorded is in MLflow exactly once (by the child runs' val_bpd histories)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    state = json.loads((experiment_dir / "mlflow.json").read_text())
    recorded = {}
    for path in experiment_dir.glob("*/result.json"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            recorded.setdefault(r["trial_id"], []).append(r["step"])
    runs, token = [], None
    while True:
        page = client.search_runs(
            [state["experiment_id"]],
            f"tags.mlflow.parentRunId = '{state['parent_run_id']}'",
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    by_trial = {r.data.tags["trial_id"]: r.info.run_id for r in runs}
    wrong = [
        tid
        for tid, steps in recorded.items()
        if tid not in by_trial
        or sorted(m.step for m in client.get_metric_history(by_trial[tid], "seconds")) != sorted(set(steps))
    ]
    return (
        f"yes ({len(recorded)} trials)"
        if not wrong and len(by_trial) == len(recorded)
        else f"NO: {len(wrong)} trials differ, {len(by_trial)} runs for {len(recorded)} trials"
    )


def main_load(args) -> None:
    from tests.servers import MlflowServer, Postgres, postgres_bin

    folder = Path(tempfile.mkdtemp(prefix="vpsde-driver-load-"))
    space = write_space(folder, args.trials, args.concurrent)
    modes = args.modes.split(",")
    print(
        f"{args.trials} trials, {args.concurrent} at a time (declared CPUs), time scale {args.scale}; "
        f"working in {folder}",
        flush=True,
    )
    postgres = server = proxy = None
    head = RayHead(args.concurrent, folder)
    rows = []
    try:
        if {"postgres", "slow"} & set(modes):
            postgres = Postgres(postgres_bin()).start()
            server = MlflowServer(postgres.uri, folder).start()
            proxy = SlowProxy(server.uri, args.delay)
        for mode in modes:
            uri = {"postgres": server and server.uri, "slow": proxy and proxy.uri}.get(
                mode, f"sqlite:///{folder / 'off.db'}"
            )
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--space",
                str(space),
                "--storage",
                str(folder / "runs"),
                "--address",
                head.address,
                "--mlflow-uri",
                uri,
                "--scale",
                str(args.scale),
            ]
            print(f"\n== {mode}: {' '.join(cmd[2:])}", flush=True)
            log = folder / f"{mode}.log"
            with open(log, "w") as out:
                proc = subprocess.run(
                    cmd, env={**head.env, "RAY_DEDUP_LOGS": "1"}, stdout=out, stderr=subprocess.STDOUT, cwd=folder
                )
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
            if proc.returncode not in (0, 3) or not lines:
                print(f"{mode}: driver exited {proc.returncode}; see {log}", flush=True)
                continue
            row = json.loads(lines[-1][len("RESULT ") :])
            if mode != "off":
                row["arrived"] = arrived_once(server.uri, folder / "runs" / f"load-{mode}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for thing in (proxy, server, postgres):
            if thing is not None:
                thing.stop()
        head.stop()
    print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    off = next((r["search_s"] for r in rows if r["mode"] == "off"), math.nan)
    print(
        f"\n{args.trials} trials, {args.concurrent} at a time, scale {args.scale}, delay {args.delay} s "
        f"(slow); {os.cpu_count()} cores"
    )
    header = (
        "mode",
        "search s",
        "vs off",
        "rungs/s",
        "lag med s",
        "lag p99 s",
        "stall max ms",
        "cpu s",
        "rss MB",
        "export s",
        "report s",
        "exit",
        "arrived once",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        tracked = r["mode"] != "off"  # off: the callback does nothing, so it has no lags or stalls to show
        print(
            " | ".join(
                [
                    r["mode"],
                    f"{r['search_s']:.0f}",
                    f"{r['search_s'] / off:.3f}",
                    f"{r['results'] / r['search_s']:.1f}",
                    f"{r['lag_median_s']:.2f}" if tracked else "-",
                    f"{r['lag_p99_s']:.2f}" if tracked else "-",
                    f"{r['stall_max_ms']:.1f}" if tracked else "-",
                    f"{r['cpu_s']:.0f}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r.get('export_s', math.nan):.1f}",
                    f"{r.get('report_s', math.nan):.1f}",
                    str(r["status"]),
                    r.get("arrived", "-"),
                ]
            )
        )


def main_tiny(args) -> None:
    """The whole tune.py on tiny.yaml (6 trials x 10 rungs, FIFO, seeded), direct and behind the slow proxy."""
    from tests.servers import MlflowServer

    folder = Path(tempfile.mkdtemp(prefix="vpsde-tiny-load-"))
    raw = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text())
    raw["fixed"]["train"].update(steps=100, val_every=10)
    raw["search"].update(scheduler="fifo", num_samples=6, max_concurrent=2, seed=0)
    space = folder / "tiny6.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    server = MlflowServer(f"sqlite:///{folder / 'server.db'}", folder).start()
    proxy = SlowProxy(server.uri, args.delay)
    times = {}
    try:
        for label, uri in (("direct", server.uri), (f"proxy {args.delay} s", proxy.uri)):
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "tune.py"),
                    "--space",
                    str(space),
                    "--name",
                    label.split()[0],
                    "--storage",
                    str(folder / "runs"),
                    "--mlflow-uri",
                    uri,
                ],
                cwd=folder,
                capture_output=True,
                text=True,
            )
            times[label] = time.perf_counter() - t0
            print(f"{label}: {times[label]:.1f} s, exit {proc.returncode}", flush=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:] + proc.stderr[-2000:])
    finally:
        proxy.stop()
        server.stop()
    direct, slow = times.values()
    print(
        f"\ntiny.yaml, 6 trials x 10 rungs, FIFO: direct {direct:.1f} s, behind the proxy {slow:.1f} s: "
        f"{slow / direct:.2f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--concurrent", type=int, default=64)
    p.add_argument("--scale", type=float, default=0.05, help="sleep = recorded seconds x scale")
    p.add_argument("--modes", default="off,postgres,slow")
    p.add_argument("--delay", type=float, default=0.2, help="seconds the slow proxy adds to every request")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--space", "--storage", "--address", "--mlflow-uri"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    # A SIGTERM (a timeout, a closed session) still stops the servers and the Ray node started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child:
        args.mode = args.child
        child(args)
    elif args.tiny:
        main_tiny(args)
    else:
        main_load(args)


if __name__ == "__main__":
    main()
