"""`python -m services.serve` (what `make serve` and the Docker image run): serve the packaged Bento.

Serves, in this order: `--models-dir DIR` / CONVFORGE_MODELS_DIR (the train stage's
artifacts/models, from the working tree: development and tests); `--bento TAG|FILE.bento`
/ CONVFORGE_BENTO (a .bento archive is imported into the store first); else the Bento
that `pipelines.stages.package` recorded in artifacts/bento/bento.json. Host and port come from
params.yaml's `serve` section (127.0.0.1:3000), overridden by --host/--port or
CONVFORGE_HOST/CONVFORGE_PORT. The store is `<project>/.bentoml` unless BENTOML_HOME is set
(`BENTOML_HOME=.bentoml bentoml list` shows it).

Each server runs with a BENTOML_HOME of its own, `<tmp>/convforge-serve-<host>-<pid>-*`, whose `bentos`
and `models` link to the store: BentoML keeps the Prometheus multiprocess files at
`<BENTOML_HOME>/prometheus_multiproc_dir` and empties that folder when a server starts, so servers
sharing one home would wipe and mix each other's /metrics (BentoML 1.4 offers no setting for that
folder alone). The folders of servers no longer running are removed when the next one starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENTO_JSON = ROOT / "artifacts" / "bento" / "bento.json"
INSTANCE_PREFIX = "convforge-serve-"


def archive_tag(path: Path) -> str:
    """The `name:version` recorded in a .bento archive's bento.yaml."""
    import tarfile

    import yaml

    with tarfile.open(path, "r:*") as archive:
        member = next(m for m in archive.getmembers() if m.name.lstrip("./") == "bento.yaml")
        info = yaml.safe_load(archive.extractfile(member).read())
    return f"{info['name']}:{info['version']}"


def import_archive(path: Path) -> str:
    """Import a .bento archive into the store unless that Bento is there already; returns its tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = archive_tag(path)
    try:
        bentoml.bentos.get(tag)
    except NotFound:
        bentoml.bentos.import_bento(str(path))
    return tag


def resolve_bento(bento: str | None) -> str:
    """The Bento tag to serve: an explicit tag/archive, else bento.json's."""
    from models._errors import ConvForgeError

    if bento is None:
        if not BENTO_JSON.is_file():
            raise ConvForgeError(f"{BENTO_JSON.relative_to(ROOT)} not found: run `python -m pipelines.stages.package` "
                                 "(or `dvc repro`) first, or serve artifacts/models with --models-dir")
        summary = json.loads(BENTO_JSON.read_text())
        # The archive is the packaged Bento itself: importing it (once) works with any BENTOML_HOME.
        return import_archive(BENTO_JSON.parent / summary["archive"])
    if bento.endswith(".bento"):
        if not Path(bento).is_file():
            raise ConvForgeError(f"{bento}: no such Bento archive")
        return import_archive(Path(bento))
    return bento


def instance_home(store: Path) -> Path:
    """A new BENTOML_HOME for the server this process becomes (`bentoml serve` keeps its pid): its own
    Prometheus folder, with the store's `bentos` and `models` linked in. Making it removes the homes of this
    machine's servers no longer running (removing a home removes the links, never the store)."""
    from pipelines import scratch

    home = scratch.make(INSTANCE_PREFIX)
    for part in ("bentos", "models"):
        (store / part).mkdir(parents=True, exist_ok=True)
        (home / part).symlink_to(store.resolve() / part, target_is_directory=True)
    return home


def check(port: int) -> bool:
    """True when the local service answers /readyz with 200 (the Docker HEALTHCHECK)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def command(target: str, host: str, port: int) -> list[str]:
    """The `bentoml serve` command line for `target` (a Bento tag or `module:Service`)."""
    return [sys.executable, "-m", "bentoml", "serve", target, "--host", host, "--port", str(port)]


def main(argv: list[str] | None = None) -> None:
    from pipelines.errors import stage_entry

    parser = argparse.ArgumentParser(prog="python -m services.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--bento", help="Bento tag or .bento archive (default: artifacts/bento/bento.json)")
    parser.add_argument("--models-dir", help="serve <dir>/<task>/ model folders from the working tree")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--import-only", action="store_true", help="import the Bento archive and exit")
    parser.add_argument("--check", action="store_true", help="exit 0 if the local service is ready (healthcheck)")
    args = parser.parse_args(argv)

    @stage_entry
    def run() -> None:
        import pipelines.runtime  # noqa: F401  (telemetry off)
        from pipelines.params import load_params
        from services.catalog import MODELS_DIR_ENV, use_project_store

        use_project_store(ROOT)
        params = load_params(os.environ.get("CONVFORGE_PARAMS", ROOT / "params.yaml")).serve
        host = args.host or os.environ.get("CONVFORGE_HOST") or params.host
        port = args.port or int(os.environ.get("CONVFORGE_PORT") or params.port)
        if args.check:
            raise SystemExit(0 if check(port) else 1)
        models_dir = args.models_dir or os.environ.get(MODELS_DIR_ENV)
        if models_dir:
            os.environ[MODELS_DIR_ENV] = str(Path(models_dir).resolve())
            os.chdir(ROOT)
            target = "services.service:ConvForge"
        else:
            target = resolve_bento(args.bento or os.environ.get("CONVFORGE_BENTO"))
        if args.import_only:
            print(f"serve: {target} is in the store ({os.environ['BENTOML_HOME']})", flush=True)
            return
        from services.backends import serve_device

        device = serve_device(params.device)  # serve.device cuda without a GPU: one line here, not in a worker
        cmd = command(target, host, port)
        os.environ["BENTOML_HOME"] = str(instance_home(Path(os.environ["BENTOML_HOME"])))
        print(f"serve: {target} on http://{host}:{port}, models on {device} "
              f"(BENTOML_HOME {os.environ['BENTOML_HOME']})", flush=True)
        os.execv(cmd[0], cmd)

    run()


if __name__ == "__main__":
    main()
