"""Kept so that `python -m util.fake_cifar DIR` (older docs) still works: see dataio/fake.py."""
from dataio.fake import main

if __name__ == "__main__":
    main()
