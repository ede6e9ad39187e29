"""A local judge of answers. NEFTune's claim is that answers get better as judged pairwise (AlpacaEval, with GPT-4
as the judge); here a local Hugging Face model judges, offline. `pairwise`: a causal LM is shown the instruction
and two answers and asked which is better (neftlab's prompt, or AlpacaEval 2's), in both orders; `reward`: a
sequence classifier scores each answer. Before its win rates count, the judge proves itself on controls built from
the same prompts (`controls`). Next to the win rate comes AlpacaEval 2's length-controlled win rate, and intervals
are BCa bootstraps over the prompts (`judging`)."""

from .answers import Answers, Pair, final_answers, instruction_text, pairs_for
from .controls import CONTROLS, control_pairs, judge_controls, verdict
from .judging import add_instruction_terms, describe, judge_run
from .prompts import TEMPLATES, JudgeError, chat_messages
from .scoring import load_judge, preferences

__all__ = ["Answers", "CONTROLS", "JudgeError", "Pair", "TEMPLATES", "add_instruction_terms", "chat_messages",
           "control_pairs", "describe", "final_answers", "instruction_text", "judge_controls", "judge_run",
           "load_judge", "pairs_for", "preferences", "verdict"]
