"""The methods under study, as hooks and callbacks around the Hugging Face Trainer: the noise kinds (`noise`, a
module each), the passes FreeLB and antithetic noise need (`passes`), Sparse-NEFT's pruning (`pruning`, `pruner`);
`factory` builds what a config asks for."""
