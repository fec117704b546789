"""edgevlm sweep: the checkpoint x encoder x decoder x device matrix, expanded into stages (export, verify, build-engine,
eval, bench), run by an executor (a local process pool, or Ray across build hosts and devices) and gathered into one
report. Modules: spec (what to run), matrix (the stages), bundles (content addresses), stages (one stage as a
subprocess -> one record), records (the append-only JSONL), executors (local, ray), report (table, JSON, PNG)."""
