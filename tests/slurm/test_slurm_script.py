"""slurm/pretrain_1p3b.sh without a cluster: the rendezvous port it derives from the job id and
restart count stays out of Linux's ephemeral port range for every job."""

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "pretrain_1p3b.sh"
EPHEMERAL = range(32768, 61000)  # net.ipv4.ip_local_port_range default: 32768 60999


def test_master_port_is_outside_the_ephemeral_range():
    (line,) = [x for x in SCRIPT.read_text().splitlines() if x.startswith("export MASTER_PORT=")]
    # the script's own line, evaluated by bash for every job id mod 10^4 and restart count
    loop = f"for SLURM_JOB_ID in $(seq 990000 999999); do for SLURM_RESTART_COUNT in 0 1 2 3; do {line}; " \
           "echo $MASTER_PORT; done; done"
    ports = [int(p) for p in subprocess.run(["bash", "-c", loop], capture_output=True, text=True,
                                            check=True).stdout.split()]
    assert len(ports) == 40000
    assert all(1024 <= p < 65536 and p not in EPHEMERAL for p in ports), (min(ports), max(ports))
    # a requeued job (restart + 1) never reuses its predecessor's port
    assert all(len(set(ports[j : j + 4])) == 4 for j in range(0, len(ports), 4))
