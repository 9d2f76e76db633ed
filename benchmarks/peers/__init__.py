"""Peer libraries that the benchmarks compare against, each in a venv of its own.

llm-compressor (PyPI ``llmcompressor``) pins ``torch<=2.14.0`` and ``transformers<=5.17.0``, older than the
project's, so it cannot live in the project venv. :func:`peer_python` builds ``.venv-peers/llmcompressor`` once: a
bare venv whose own packages (llm-compressor and the pins in :data:`PINS`, all installed ``--no-deps``) come first on
``sys.path``, followed by the project venv's site-packages through a ``.pth`` file, so torch 2.14.1 (and numpy,
accelerate, gguf, pydantic, ...) are shared with the project and nothing downloads torch. :func:`run_peer` runs
``llmcompressor_run.py`` there as a subprocess and returns its one-line JSON result.

Nothing here imports the peer: the project venv stays untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PEERS_DIR = REPO / ".venv-peers"  # git-ignored

# Exact versions installed --no-deps into the peer venv, on top of the project venv's packages. Chosen so that every
# declared requirement of llmcompressor that the project venv does not satisfy is met here (transformers<=5.17.0,
# which needs huggingface-hub<2, which needs httpx<1; datasets, which llmcompressor imports at module level, with
# pyarrow/pandas/dill/multiprocess/xxhash). torch<=2.14.0 is the one pin NOT met: the project's 2.14.1 is used.
# Not installed: auto-round (only for AutoRoundModifier, skipped by llmcompressor's modifier registry when missing),
# nvidia-ml-py (GPU memory queries only).
PINS: dict[str, tuple[str, ...]] = {
    "llmcompressor": (
        "llmcompressor==0.14.0.1",
        "compressed-tensors==0.19.0",
        "transformers==5.17.0",
        "huggingface-hub==1.33.0",
        "httpx==0.28.1",
        "httpcore==1.0.9",
        "loguru==0.7.3",
        "datasets==5.2.0",
        "pyarrow==26.0.1",
        "pandas==3.1.1",
        "dill==0.4.1",
        "multiprocess==0.70.19",
        "xxhash==3.6.0",
    ),
}

# Run in the peer venv after installing: each must import, and torch must be the project venv's.
_CHECK = (
    "import json, torch, transformers, compressed_tensors, datasets, llmcompressor; "
    "print(json.dumps({'torch': torch.__version__, 'torch_file': torch.__file__, "
    "'transformers': transformers.__version__, 'llmcompressor': llmcompressor.__version__}))"
)

RUNNERS = {"llmcompressor": Path(__file__).with_name("llmcompressor_run.py")}


def _project_site_packages() -> Path:
    """The site-packages of the project venv: the running interpreter's if it is a venv, else ``REPO/.venv``'s."""
    if sys.prefix != sys.base_prefix:
        return Path(sysconfig.get_paths()["purelib"])
    venv_py = REPO / ".venv" / "bin" / "python"
    if not venv_py.exists():
        raise RuntimeError(f"no project venv at {venv_py.parent.parent} (run ./dev.sh env first)")
    out = subprocess.run(
        [str(venv_py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _log_tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # one installer at a time; others wait, then find the stamp
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def peer_python(name: str = "llmcompressor") -> Path:
    """The python of the peer venv ``.venv-peers/NAME``, created and installed on first use (idempotent).

    A stamp file named after the hash of the pins and of the project site-packages path marks a finished install;
    while it is present this returns at once. Otherwise the venv is (re)built: ``python -m venv``, ``pip install
    --no-deps`` of :data:`PINS`, a ``.pth`` file appending the project venv's site-packages (written after pip ran,
    so pip never sees the project's packages), then an import check. The log is ``.venv-peers/NAME-install.log``.

    Raises:
        KeyError: unknown peer.
        RuntimeError: the setup failed; the message holds the log's tail.
    """
    pins = PINS[name]
    venv = PEERS_DIR / name
    py = venv / "bin" / "python"
    site = _project_site_packages()
    digest = hashlib.sha1(("\n".join(pins) + "\n" + str(site)).encode()).hexdigest()[:16]
    stamp = venv / f".installed-{digest}"
    if stamp.exists() and py.exists():
        return py
    log = PEERS_DIR / f"{name}-install.log"
    with _locked(PEERS_DIR / f"{name}.lock"):
        if stamp.exists() and py.exists():
            return py
        if venv.exists():
            shutil.rmtree(venv)  # a half-built or outdated venv: start over
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)
        with open(log, "w") as fh:

            def step(cmd: list[str], what: str, timeout: float) -> str:
                fh.write(f"$ {' '.join(cmd)}\n")
                fh.flush()
                try:
                    out = subprocess.run(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout
                    )
                except subprocess.TimeoutExpired as err:
                    fh.write(f"{err}\n")
                    fh.flush()
                    raise RuntimeError(f"peer venv {name}: {what} timed out after {timeout:.0f} s; log {log}") from err
                fh.write(out.stdout)
                fh.flush()
                if out.returncode != 0:
                    raise RuntimeError(
                        f"peer venv {name}: {what} failed (exit {out.returncode}); log {log}, its tail:\n"
                        + _log_tail(log)
                    )
                return out.stdout

            base = getattr(sys, "_base_executable", None) or sys.executable
            step([base, "-m", "venv", str(venv)], "python -m venv", 300)
            step([str(py), "-m", "pip", "install", "--no-deps", "--no-input", *pins], "pip install --no-deps", 1800)
            peer_site = Path(
                step([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "site path", 60)
                .strip()
                .splitlines()[-1]
            )
            # A path line in a .pth file is appended to sys.path after the venv's own site-packages: the peer's
            # packages win, everything else (torch 2.14.1, numpy, accelerate, gguf, ...) comes from the project venv.
            # The .pth files inside the project site-packages (its editable lightning_compress) are not processed.
            (peer_site / "zz_project_venv.pth").write_text(f"{site}\n")
            found = json.loads(step([str(py), "-c", _CHECK], "import check", 300).strip().splitlines()[-1])
            fh.write(f"import check: {found}\n")
            if not found["torch_file"].startswith(str(site)):
                raise RuntimeError(f"peer venv {name}: torch came from {found['torch_file']}, not {site}; log {log}")
        stamp.touch()
    return py


def run_peer(config: dict, data_file: Path, timeout_s: float, name: str = "llmcompressor") -> dict:
    """Run the peer's runner script on ``data_file`` with ``config`` in the peer venv; its JSON result.

    The runner prints one JSON line last on stdout; a method that fails inside the peer comes back as a result with
    ``"error"`` set and ``"perplexity": None``. Threads: ``config["threads"]`` (default: ``OMP_NUM_THREADS`` or 2).

    Raises:
        RuntimeError: the runner timed out, crashed or printed no JSON; the message holds its stderr's tail.
    """
    py = peer_python(name)
    threads = str(config.get("threads") or os.environ.get("OMP_NUM_THREADS") or 2)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONNOUSERSITE="1",
    )
    env.pop("PYTHONPATH", None)  # the peer must not see the project's checkout
    cmd = [str(py), str(RUNNERS[name]), "--config", json.dumps(config), "--data", str(data_file)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=PEERS_DIR)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-4000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise RuntimeError(f"{name} runner timed out after {timeout_s:.0f} s ({config}); stderr tail:\n{tail}") from err
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    raise RuntimeError(
        f"{name} runner exited {out.returncode} without a JSON result ({config}); stderr tail:\n{out.stderr[-4000:]}"
    )


# Peers whose requirements do not clash with the project's: installed --no-deps into the running venv when missing.
IN_PROJECT = {"torchao": "torchao==0.18.0"}


def ensure_in_project(name: str) -> str:
    """Import name ``name`` installed in this venv (``pip install --no-deps`` of :data:`IN_PROJECT` if missing);
    returns its version."""
    import importlib
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", IN_PROJECT[name]]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"installing {IN_PROJECT[name]} failed:\n{out.stdout[-2000:]}")
    importlib.invalidate_caches()
    return importlib.metadata.version(name)
