"""Runs read back: the run index and pairing (`runs`), paired differences (`paired`), tables, plots, searches, the
report, AlpacaEval's import and export, and the W&B push."""
