"""`make demo`: the main job on the bundled default data, CPU only.

Grows with the pipeline: today it shows the environment; each stage adds its step here.
"""

import subprocess
import sys


def run(*args: str) -> None:
    print("$ vqtok", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "vqtok", *args], check=True)


if __name__ == "__main__":
    run("info")
