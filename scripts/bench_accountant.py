"""PLD epsilon of Passerelle's accounting against an independent accountant.

Microsoft's prv-accountant (Gopi, Lee, Wutschitz 2021; not a dependency of the package) is
installed by this script into its own virtual environment under /tmp (created with pip
on first use), and run there on the same DP-SGD settings (Poisson sampling q, noise
multiplier z, steps, delta). Passerelle's figure (dp-accounting 0.4.3's PLD, pessimistic,
discretisation 1e-4) is valid if it is not below prv-accountant's lower bound; it
should be close to its estimate. RDP is printed beside it (an upper bound, looser).

Usage: python scripts/bench_accountant.py [--venv /tmp/passerelle-prv-venv] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from adapters.dp import Accountant, dp_sgd_event, epsilon_of

PRV_VERSION = "0.2.0"
SETTINGS = [  # q, z, steps, delta
    (256 / 60000, 1.1, 14062, 1e-5),  # tensorflow-privacy's MNIST tutorial
    (0.1, 1.0, 400, 1e-5),  # a Y-sized fine-tuning run
    (0.5, 2.5, 60, 1e-6),  # few units, large q
]
_SNIPPET = """
import json, sys
from prv_accountant.dpsgd import DPSGDAccountant
out = []
for q, z, steps, delta in json.loads(sys.argv[1]):
    acc = DPSGDAccountant(noise_multiplier=z, sampling_probability=q, eps_error=0.01,
                          delta_error=delta / 1000, max_steps=steps)
    low, est, up = acc.compute_epsilon(delta=delta, num_steps=steps)
    out.append([low, est, up])
print(json.dumps(out))
"""


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import prv_accountant"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        f"prv-accountant=={PRV_VERSION}"], check=True)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/passerelle-prv-venv"),  # noqa: S108
                        help="virtual environment for prv-accountant (default "
                        "/tmp/passerelle-prv-venv)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here (default: none)")
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    done = subprocess.run([str(python), "-c", _SNIPPET, json.dumps(SETTINGS)],
                          capture_output=True, text=True, check=True)
    prv = json.loads(done.stdout)
    rows = []
    print(f"{'q':>9} {'z':>5} {'steps':>6} {'delta':>6} | {'PLD (ours)':>10} {'RDP':>7} | "
          f"{'prv low':>8} {'prv est':>8} {'prv up':>8} | valid")
    for (q, z, steps, delta), (low, est, up) in zip(SETTINGS, prv, strict=True):
        event = dp_sgd_event(q, z, steps)
        pld = epsilon_of([event], delta, Accountant.PLD)
        rdp = epsilon_of([event], delta, Accountant.RDP)
        valid = pld >= low
        rows.append({"q": q, "z": z, "steps": steps, "delta": delta, "pld": pld, "rdp": rdp,
                     "prv_low": low, "prv_estimate": est, "prv_upper": up, "valid": valid})
        print(f"{q:9.5f} {z:5.2f} {steps:6d} {delta:6.0e} | {pld:10.4f} {rdp:7.4f} | "
              f"{low:8.4f} {est:8.4f} {up:8.4f} | {'yes' if valid else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"prv_accountant": PRV_VERSION, "rows": rows},
                                        indent=1) + "\n")
    return 0 if all(r["valid"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
