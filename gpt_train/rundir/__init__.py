"""The run directory (--checkpoint_dir) that train.py writes and the other commands read, by job:

- names.py: what each file is called, which of them hold a run, the flags a reader names one by
  (no torch: plot.py and every --help import it);
- reading.py: which file a reader loads, and the newest step checkpoint that reads;
- rules.py: the README's "Safety" rules, each a refusal before any file is touched, and what a
  run replaces or sets aside (`RunDirectory`);
- lock.py: one training run per directory (train.lock);
- moves.py: the file operations those rules ask for: set aside, delete all or none, leftovers.
"""
