"""`python -m ecdit.bench <name> [--flags]`, the same as `ecdit bench <name>`."""
from absl import app

from ecdit.bench.main import main

if __name__ == '__main__':
  app.run(main)
