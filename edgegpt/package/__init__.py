"""`edgegpt package`: a finished bundle -> a deployable package for one target (package/targets.py)."""
