"""The methods under study, as hooks and callbacks around the Hugging Face Trainer: noise on the embeddings
(`noise`, `noise_callback`, `dynamic`), FreeLB (`freelb`), NoisyTune (`noisytune`), Sparse-NEFT's pruning (`pruning`,
`pruner`); `factory` builds what a config asks for."""
