"""A local judge of answers. NEFTune's claim is that answers get better as judged pairwise (AlpacaEval, with GPT-4
as the judge); here a local Hugging Face model judges, offline. `pairwise`: a causal LM is shown the instruction
and two answers and asked which is better (neftlab's prompt, or AlpacaEval 2's, `prompts`), in both orders;
`reward`: a sequence classifier scores each answer (`scoring`). Before its win rates count, the judge proves itself
on controls built from the same prompts (`controls`). Next to the win rate comes AlpacaEval 2's length-controlled
win rate, and intervals are BCa bootstraps over the prompts (`judging`). What is judged is a run's last complete
generation of answers (`answers`). The modules that need no model (`answers`, `controls`, `prompts`) load none."""
