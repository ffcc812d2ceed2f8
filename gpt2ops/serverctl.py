"""Start-up checks, the start-up watch and the stop of a TorchServe run from a run directory.

The Python half of `scripts/serve.sh` and `scripts/stop.sh` (which stay the entry points):

    python -m gpt2ops.serverctl preflight --config C --run-dir R [--reuse]
    python -m gpt2ops.serverctl wait-up   --config C --run-dir R [--pid PID] [--launch-rc N] [--log-from BYTES]
    python -m gpt2ops.serverctl stop      --run-dir R [--timeout S]

`preflight` refuses to start a second server from the same run directory (saying which one runs and
how to stop it; with `--reuse` a healthy one is reused: exit status 3) and checks every port of the
config before TorchServe tries them, naming the process that holds a busy one. `wait-up` waits for
/ping and watches the frontend process meanwhile: when it dies, the line of its output that says why
is printed at once. `stop` returns only once the frontend and its workers are gone (bounded wait).
Every failure is one line (gpt2ops.errors).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from gpt2ops import server_logs
from gpt2ops.client import TorchServe, read_properties
from gpt2ops.errors import OpsError, cli
from gpt2ops.frontend_patch import FRONTEND_DIR

FRONTEND_CLASS = "org.pytorch.serve.ModelServer"
PID_FILE = Path("tmp") / ".model_server.pid"  # TMPDIR=<run-dir>/tmp for the launcher (scripts/serve.sh)
REUSE = 3  # exit status of `preflight --reuse` when a healthy server from the run directory is reused
HTTP_ADDRESSES = (("inference_address", "http://127.0.0.1:8080"), ("management_address", "http://127.0.0.1:8081"),
                  ("metrics_address", "http://127.0.0.1:8082"))
GRPC_PORTS = (("grpc_inference_port", "grpc_inference_address", 7070),
              ("grpc_management_port", "grpc_management_address", 7071))


# ---- processes ----

def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def is_frontend(proc: psutil.Process) -> bool:
    return FRONTEND_CLASS in _cmdline(proc)


def started_from(proc: psutil.Process) -> Path | None:
    """The run directory of a TorchServe frontend: its working directory (scripts/serve.sh cds to
    <run-dir>/frontend; gpt2ops.frontend_patch), or that directory itself for a server started by hand."""
    try:
        cwd = Path(proc.cwd()).resolve()
    except (psutil.Error, OSError):
        return None
    return cwd.parent if cwd.name == FRONTEND_DIR else cwd


def pid_file_pid(run_dir: Path) -> int | None:
    """The pid `torchserve --start` wrote for the frontend it launched from `run_dir`."""
    try:
        return int((run_dir / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def frontend(run_dir: Path) -> psutil.Process | None:
    """The running TorchServe frontend started from `run_dir`: by its pid file, else by its working directory."""
    run_dir = run_dir.resolve()
    pid = pid_file_pid(run_dir)
    try:
        proc = psutil.Process(pid) if pid else None
        if proc is not None and is_frontend(proc) and started_from(proc) in (run_dir, None):
            return proc
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        if is_frontend(proc) and started_from(proc) == run_dir:
            return proc
    return None


def workers_of(run_dir: Path) -> list[psutil.Process]:
    """Worker processes of the server from `run_dir` (their command line names its socket in <run-dir>/tmp)."""
    sock = str(run_dir.resolve() / "tmp" / ".ts.sock")
    return [p for p in psutil.process_iter() if any(arg.startswith(sock) for arg in _cmdline(p))]


def describe(proc: psutil.Process) -> str:
    """'pid 123 (python3 -m http.server 8080)', or for a TorchServe frontend the directory it runs from."""
    if is_frontend(proc):
        return f"a TorchServe frontend (pid {proc.pid}, started from {started_from(proc) or 'an unknown directory'})"
    words = " ".join(_cmdline(proc)) or _safe_name(proc)
    return f"pid {proc.pid} ({words[:100] + ('…' if len(words) > 100 else '')})"


def _safe_name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


# ---- ports ----

@dataclass(frozen=True)
class Endpoint:
    key: str  # the config.properties key that sets the port
    host: str
    port: int


def endpoints(props: dict[str, str]) -> list[Endpoint]:
    """Every TCP port the config makes TorchServe listen on (values TorchServe cannot parse are left to it)."""
    out = []
    for key, default in HTTP_ADDRESSES:
        parts = urlsplit(props.get(key, default))
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            continue
        if parts.hostname:
            out.append(Endpoint(key, parts.hostname, port))
    for key, address_key, default in GRPC_PORTS:
        try:
            out.append(Endpoint(key, props.get(address_key, "127.0.0.1"), int(props.get(key, default))))
        except ValueError:
            continue
    return out


def port_in_use(host: str, port: int) -> bool:
    """True when binding (host, port) fails because something holds it (as TorchServe's own bind would)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError):
        return False
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover does not block a server
        try:
            s.bind(address)
        except OSError as err:
            return err.errno == 98 or "in use" in str(err)  # EADDRINUSE
    return False


def port_holder(port: int) -> psutil.Process | None:
    """The process listening on TCP `port`, where the system tells (root, or the same user)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    except (psutil.Error, OSError):
        pass
    return None


def busy_port_error(port: int, where: str, config: Path, key: str | None = None) -> OpsError:
    """'port P (...) is already in use by <who>; <stop it or change the port>'."""
    holder = port_holder(port)
    who = describe(holder) if holder else f"another program (`ss -ltnp 'sport = :{port}'` shows which)"
    change = f"give {key or 'that address'} another port in {config}"
    if holder is not None and is_frontend(holder) and started_from(holder):
        step = f"stop it with scripts/stop.sh --run-dir {started_from(holder)}, or {change}"
    else:
        step = f"stop that program, or {change}"
    return OpsError(f"port {port} {where} is already in use by {who}", step)


# ---- commands ----

def preflight(config: Path, run_dir: Path, reuse: bool = False, stop_timeout: float = 60) -> int:
    props = read_properties(config)
    client = TorchServe.from_config(config, run_dir)
    running = frontend(run_dir)
    if running is not None:
        where = f"from {run_dir} (pid {running.pid}, {client.inference_url})"
        if not reuse:
            raise OpsError(f"TorchServe is already running {where}",
                           f"use it as it is, or stop it first with scripts/stop.sh --run-dir {run_dir} (make stop)")
        if client.ping():
            print(f"TorchServe is already running {where}: reusing it: same keys, its registered models stay "
                  f"(make stop first for a fresh server)", flush=True)
            return REUSE
        print(f"TorchServe is running {where} but does not answer /ping: restarting it", flush=True)
        stop(run_dir, stop_timeout)
    for ep in endpoints(props):
        if port_in_use(ep.host, ep.port):
            raise busy_port_error(ep.port, f"on {ep.host} ({ep.key} in {config})", config, ep.key)
    return 0


def _start_failure(config: Path, run_dir: Path, log_from: int) -> tuple[str | None, OpsError | None]:
    """(the line saying why TorchServe did not start, a more specific error when it is a busy port)."""
    logs = run_dir / "logs"
    line = server_logs.startup_error(server_logs.read_from(logs / server_logs.CONSOLE),
                                     server_logs.read_from(logs / server_logs.FRONTEND_LOG, log_from))
    if line and "Failed to bind to address" in line:
        try:
            port = urlsplit(line.split("Failed to bind to address:", 1)[1].split()[0]).port
        except (ValueError, IndexError):
            port = None
        if port:
            return line, busy_port_error(port, f"(TorchServe: {line})", config)
    return line, None


def wait_up(config: Path, run_dir: Path, timeout: float = 180, watch_pid: int | None = None,
            launch_rc: int = 0, log_from: int = 0) -> int:
    """Wait for /ping to answer Healthy; fail at once, with TorchServe's own reason, when it stops."""
    logs = run_dir / "logs"
    console, ts_log = logs / server_logs.CONSOLE, logs / server_logs.FRONTEND_LOG
    where = f"full output: {console} and {ts_log}"
    if launch_rc:
        line, busy = _start_failure(config, run_dir, log_from)
        lines = [x.strip() for x in server_logs.read_from(console).splitlines() if x.strip()]
        raise busy or OpsError(f"torchserve --start failed (exit status {launch_rc}): "
                               f"{line or (lines[-1] if lines else 'no output')}", where)
    client = TorchServe.from_config(config, run_dir)
    # the frontend `torchserve --start` launched (background), or the launcher that waits for it (foreground)
    watch_pid = watch_pid or pid_file_pid(run_dir)
    start = time.monotonic()
    while True:
        if client.ping():
            pid = getattr(frontend(run_dir), "pid", watch_pid)
            print(f"TorchServe is up: {client.inference_url} (pid {pid}, keys: {client.key_file}, logs: {logs})",
                  flush=True)
            return 0
        if watch_pid is None or not alive(watch_pid):
            time.sleep(0.3)  # its last lines reach the files
            line, busy = _start_failure(config, run_dir, log_from)
            raise busy or OpsError(f"TorchServe stopped while starting: {line or 'it wrote no error line'}", where)
        if time.monotonic() - start > timeout:
            line, _ = _start_failure(config, run_dir, log_from)
            raise OpsError(f"TorchServe (pid {watch_pid}) did not answer {client.inference_url}/ping within "
                           f"{timeout:.0f} s" + (f"; the last error in its output: {line}" if line else ""),
                           f"see {logs}; stop it with scripts/stop.sh --run-dir {run_dir}")
        time.sleep(0.25)


def stop(run_dir: Path, timeout: float = 60) -> int:
    """Stop the server from `run_dir` and return once the frontend and its workers are gone."""
    run_dir = run_dir.resolve()
    start = time.monotonic()
    proc = frontend(run_dir)
    if proc is not None:
        try:
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            procs = [proc]
        proc.terminate()  # what `torchserve --stop` does; the frontend then stops its workers
    else:
        procs = workers_of(run_dir)  # workers left behind by a frontend that died
        if not procs:
            (run_dir / PID_FILE).unlink(missing_ok=True)
            print(f"no TorchServe is running from {run_dir}", flush=True)
            return 0
        for p in procs:
            p.terminate()
    _, left = psutil.wait_procs(procs, timeout=timeout)
    while not left:  # a worker the frontend started while it was stopping
        left = workers_of(run_dir)
        if not left or time.monotonic() - start > timeout:
            break
        _, left = psutil.wait_procs(left, timeout=max(0.1, timeout - (time.monotonic() - start)))
    if left:
        pids = " ".join(str(p.pid) for p in left)
        raise OpsError(f"TorchServe from {run_dir} did not stop within {timeout:.0f} s: "
                       f"{', '.join(describe(p) for p in left)} still running", f"kill them with: kill -9 {pids}")
    for stale in (run_dir / PID_FILE, run_dir / "key_file.json"):  # the keys of a stopped server are useless
        stale.unlink(missing_ok=True)
    what = f"pid {proc.pid} and {len(procs) - 1} child process(es)" if proc else f"{len(procs)} leftover worker(s)"
    print(f"stopped TorchServe from {run_dir} ({what}) in {time.monotonic() - start:.1f} s", flush=True)
    return 0


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("preflight", "wait-up", "stop"):
        sub = commands.add_parser(name)
        sub.add_argument("--run-dir", type=Path, required=True)
        if name != "stop":
            sub.add_argument("--config", type=Path, required=True)
        if name == "preflight":
            sub.add_argument("--reuse", action="store_true", help="reuse a healthy server from --run-dir (exit 3)")
        if name == "wait-up":
            sub.add_argument("--pid", type=int, help="the launcher process to watch (foreground mode)")
            sub.add_argument("--launch-rc", type=int, default=0, help="exit status of `torchserve --start`")
            sub.add_argument("--log-from", type=int, default=0, help="size of ts_log.log before this start")
        sub.add_argument("--timeout", type=float, default=float(os.environ.get("TS_START_TIMEOUT", 180))
                         if name == "wait-up" else 60.0)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    if args.command == "preflight":
        return preflight(args.config, run_dir, args.reuse, args.timeout)
    if args.command == "wait-up":
        return wait_up(args.config, run_dir, args.timeout, args.pid, args.launch_rc, args.log_from)
    return stop(run_dir, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
