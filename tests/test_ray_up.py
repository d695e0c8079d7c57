"""`ray up` with the local provider on this one machine, a trainer job through `ray job submit`, `ray down`.

The cluster is ray_cluster.local.yaml with this machine's ssh details filled in. There is no listening sshd:
every ssh connection of the autoscaler runs `sshd -i` through its proxy command (DESIGN §7). That sshd runs
inside a PID namespace of its own, so the `ray stop` that `ray up`/`ray down` send to the head stops only
the test cluster, never the Ray of the test session running beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from recorder import queries
from recorder.migrate import upgrade
from recorder.pg_server import free_port
from recorder.store import create_db_engine
from tests.test_trainer_job import _config, _record_groups

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _need(condition: bool, what: str) -> None:
    if not condition:
        pytest.fail(f"the local `ray up` test needs {what} (scripts/test.sh installs it on Debian)")


@pytest.fixture
def cluster_root():
    root = Path(tempfile.mkdtemp(prefix="zu-", dir="/tmp"))  # Ray's socket paths must stay short
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def namespace_holder(cluster_root: Path):
    """A process that keeps a PID and mount namespace (with its own /proc) alive; the cluster's processes live
    in it. The autoscaler runs its commands in login shells, whose /etc/profile resets PATH: in this mount
    namespace only, /etc/profile.d gains a script that puts the project's .venv/bin first (a real node's
    setup does the same by activating the venv in ~/.bashrc)."""
    if os.geteuid() != 0:
        pytest.skip("a PID namespace for the test cluster needs root (unshare -p)")
    profile_d = cluster_root / "profile.d"
    shutil.copytree("/etc/profile.d", profile_d) if Path("/etc/profile.d").is_dir() else profile_d.mkdir()
    (profile_d / "zz-ziggurat-venv.sh").write_text(f'export PATH="{REPO_ROOT / ".venv" / "bin"}:$PATH"\n')
    # PID 1 of the namespace must reap orphans, or the stopped cluster's processes linger as zombies
    reaper = (
        "import os, time\nwhile True:\n    try:\n        os.wait()\n    except ChildProcessError:\n"
        "        time.sleep(0.2)"
    )
    inside = f"mount --bind {profile_d} /etc/profile.d && exec {sys.executable} -c '{reaper}'"
    holder = subprocess.Popen(["unshare", "-p", "-f", "--mount-proc", "sh", "-c", inside], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (children := psutil.Process(holder.pid).children()):
        assert time.monotonic() < deadline, "unshare did not start its namespace"
        time.sleep(0.05)
    yield children[0].pid
    os.killpg(holder.pid, signal.SIGKILL)  # PID 1 of the namespace goes, and every process in it with it
    holder.wait(timeout=30)


def _ssh_setup(root: Path, namespace_pid: int) -> dict[str, str]:
    """Keys and an sshd config for `sshd -i`; returns the cluster yaml's `auth` section."""
    for name in ("id", "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copy(root / "id.pub", root / "authorized_keys")
    path = f"{REPO_ROOT / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    (root / "sshd_config").write_text(
        f"HostKey {root / 'host_key'}\nAuthorizedKeysFile {root / 'authorized_keys'}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PermitRootLogin yes\nPidFile none\nSetEnv PATH={path} RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    return {
        "ssh_user": "root",
        "ssh_private_key": str(root / "id"),
        "ssh_proxy_command": f"nsenter -t {namespace_pid} -p -m {SSHD} -i -f {root / 'sshd_config'}",
    }


def _cluster_yaml(root: Path, auth: dict[str, str], dashboard_port: int) -> Path:
    cluster = yaml.safe_load((REPO_ROOT / "ray_cluster.local.yaml").read_text())
    ports = {name: free_port() for name in ("gcs", "agent", "metrics", "client", "runtime_env")}
    start = (
        # jobs run with the environment `ray start` had: the venv first, as an activated venv on a real node
        f"export PATH={REPO_ROOT / '.venv' / 'bin'}:$PATH && "
        f"RAY_AUTH_MODE=disabled ray start --head --port={ports['gcs']} --num-cpus=2 --temp-dir={root / 'ray'} "
        f"--dashboard-host=127.0.0.1 --dashboard-port={dashboard_port} --dashboard-agent-listen-port={ports['agent']} "
        f"--metrics-export-port={ports['metrics']} --ray-client-server-port={ports['client']} "
        f"--runtime-env-agent-port={ports['runtime_env']} --autoscaling-config=~/ray_bootstrap_config.yaml"
    )
    cluster.update(
        cluster_name=f"zt-{uuid.uuid4().hex[:6]}",
        auth=auth,
        file_mounts={str(root / "mounted-configs"): str(REPO_ROOT / "configs")},  # goes through rsync
        setup_commands=[f"cd {REPO_ROOT} && bash scripts/install.sh"],  # the real setup step (a no-op here)
        head_start_ray_commands=["ray stop", start],
    )
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, f"{' '.join(args[:3])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_ray_up_local_cluster_runs_a_submitted_trainer_job_then_ray_down(
    postgres, tiny_model_dir, cluster_root, namespace_holder
):
    for tool in ("rsync", "ssh", "ssh-keygen", "nsenter"):
        _need(shutil.which(tool) is not None, tool)
    _need(Path(SSHD).exists(), "sshd (openssh-server)")
    root = cluster_root
    ray_bin = str(REPO_ROOT / ".venv" / "bin" / "ray")
    dashboard = free_port()
    cluster = _cluster_yaml(root, _ssh_setup(root, namespace_holder), dashboard)
    url = postgres.create_database(f"ray_up_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    _record_groups(url, groups=2, size=4)
    job_config = _config(url, tiny_model_dir, root, num_workers=1, updates_per_batch=1)
    job_config = job_config.model_copy(update={"ray": job_config.ray.model_copy(update={"address": "auto"})})
    (root / "job.yaml").write_text(yaml.safe_dump(job_config.model_dump(mode="json")))
    try:
        started = time.monotonic()
        _run([ray_bin, "up", "-y", "--no-config-cache", str(cluster)], timeout=300)
        up_s = time.monotonic() - started
        assert (root / "mounted-configs" / "local.yaml").is_file()  # rsync'd by the file mount
        submitted = _run(
            [
                ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
                "--", "python", "-m", "cluster.train_job", "--config", str(root / "job.yaml"),
            ],
            timeout=600,
        )  # fmt: skip
        assert '{"version": 1}' in submitted.stdout and "succeeded" in submitted.stdout
        db = create_db_engine(url)
        try:
            (version,) = queries.list_versions(db)
        finally:
            db.dispose()
        assert version["version"] == 1 and version["status"] == "ready"
        artifact = Path(version["artifact_uri"])  # v1-b<batch>-<random>: unique across databases
        assert artifact.parent == (root / "store").resolve() and artifact.name.startswith("v1-")
        assert (artifact / "adapter_config.json").is_file()
    finally:
        down = subprocess.run(
            [ray_bin, "down", "-y", str(cluster)], capture_output=True, text=True, timeout=180, cwd=REPO_ROOT
        )
    assert down.returncode == 0, down.stderr[-2000:]
    deadline = time.monotonic() + 60
    while True:  # ray down stopped the cluster: its daemons exit
        in_namespace = subprocess.run(
            ["nsenter", "-t", str(namespace_holder), "-p", "-m", "ps", "-eo", "comm"], capture_output=True, text=True
        ).stdout.split()
        if "raylet" not in in_namespace and "gcs_server" not in in_namespace:
            break
        assert time.monotonic() < deadline, f"still running after ray down: {in_namespace}\n{down.stdout[-3000:]}"
        time.sleep(1)
    print(json.dumps({"ray_up_s": round(up_s, 1)}))
