"""Runs ``jobs/NAME.py`` in real processes forked from one that has imported them.

Started once per test session by ``conftest.JobServer``.  Importing a job's
modules (Dask, distributed, scikit-learn, Zarr, ...) takes several seconds;
here it is paid once, and each run is a child forked from this process (which
has no thread of its own): the job script runs as ``__main__`` with its own
argv, working directory, environment, stdin from /dev/null, stdout and stderr
in files, and its exit status is the child's.

Protocol, one JSON document a line: a request on stdin
``{"job", "args", "cwd", "env", "stdout", "stderr", "fsize"}``; on stdout
``{"pid": N}`` once the child is forked, then ``{"pid": N, "returncode": R}``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from pathlib import Path

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _warm() -> None:
    # What each job imports at the top of its script (its main() is not run).
    for path in sorted(JOBS.glob("*.py")):
        runpy.run_path(str(path), run_name=f"_warm_{path.stem}")


def _exit_code(code) -> int:
    # As the interpreter turns SystemExit's argument into an exit status.
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(req: dict) -> None:
    import atexit

    code = 1
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        for target, name in ((1, "stdout"), (2, "stderr")):
            fd = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        import dask

        dask.config.refresh()  # the configuration a new process would read from this environment
        if req.get("fsize"):
            import resource
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        path = str(JOBS / f"{req['job']}.py")
        sys.argv = [path, *req["args"]]
        sys.path[0] = str(JOBS)
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(code)


def main() -> None:
    sys.path[0] = str(JOBS)
    _warm()
    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        reply.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}),
              file=reply, flush=True)


if __name__ == "__main__":
    main()
