"""AI feedback: judges, direct scores, labelling pipelines, constitutional data, ratings.

Pure parts (host-side NumPy or jittable array functions):

- Ratings: :func:`elo_ratings`, :func:`bradley_terry_ratings`.
- Win rates: :func:`win_rate`, :func:`harmless_rate`, :func:`bootstrap_ci`.
- Agreement: :func:`labeler_alignment`, :func:`cohens_kappa`, :func:`fleiss_kappa`,
  :func:`rating_table`.
- Judge arithmetic: :func:`answer_preference`, :func:`debias_position`,
  :func:`position_bias`, :func:`score_distribution`, :func:`expected_score`.
- Templates: :class:`PairwiseTemplate`, :class:`ScoreTemplate`, :class:`CritiqueTemplate`,
  :class:`Exemplar`, :func:`load_exemplars` (few-shot exemplar files).
- Constitutions: :class:`Principle`, :class:`Constitution`, :func:`load_constitution`,
  :func:`default_constitution`.
- Consensus: :func:`consensus` over several judges or principles.

Model-backed parts (any ``rlhf_jax.models.CausalLM``; batched, jitted, mesh-aware):

- :class:`TextModel`: next-token log-probs and sampling on text.
- :class:`PairwiseJudge`: position-debiased soft preferences, optional few-shot and chain of
  thought.
- :class:`DirectScorer`: expected 1-10 score, usable as a PPO/GRPO reward function.
- Pipelines: :func:`label_preferences` / :func:`combine_labelers` (preference datasets with
  soft labels, consensus, agreement), :func:`sample_pairs`, :func:`judge_win_rate`,
  :func:`tournament` (matches for Elo/BT), :func:`write_jsonl`.
- Constitutional AI: :func:`critique_revision`, :func:`sl_cai_records`,
  :func:`constitutional_preferences`, :func:`rl_cai_pairs`.
"""

from rlhf_jax.rlaif._agreement import (
    Alignment,
    cohens_kappa,
    fleiss_kappa,
    labeler_alignment,
    rating_table,
)
from rlhf_jax.rlaif._consensus import CONSENSUS_METHODS, consensus
from rlhf_jax.rlaif._constitution import (
    CritiqueRevision,
    constitutional_preferences,
    critique_revision,
    rl_cai_pairs,
    sl_cai_records,
)
from rlhf_jax.rlaif._exemplars import load_exemplars
from rlhf_jax.rlaif._judge import JudgeOutput, PairwiseJudge
from rlhf_jax.rlaif._pipelines import (
    SKIP_REASONS,
    LabelledPairs,
    LabellingReport,
    combine_labelers,
    judge_win_rate,
    label_preferences,
    preference_records,
    sample_pairs,
    tournament,
    write_jsonl,
)
from rlhf_jax.rlaif._preferences import (
    answer_preference,
    debias_position,
    expected_score,
    position_bias,
    score_distribution,
    soft_to_preference_label,
)
from rlhf_jax.rlaif._principles import (
    Constitution,
    Principle,
    default_constitution,
    load_constitution,
    parse_constitution,
)
from rlhf_jax.rlaif._ratings import bradley_terry_ratings, elo_ratings
from rlhf_jax.rlaif._scorer import DirectScorer, ScoreOutput
from rlhf_jax.rlaif._templates import (
    CritiqueTemplate,
    Exemplar,
    PairwiseTemplate,
    ScoreTemplate,
    check_placeholders,
    placeholders,
)
from rlhf_jax.rlaif._text_model import TextModel, single_token_id
from rlhf_jax.rlaif._winrate import RateEstimate, bootstrap_ci, harmless_rate, win_rate

__all__ = [
    "Alignment",
    "CONSENSUS_METHODS",
    "Constitution",
    "CritiqueRevision",
    "CritiqueTemplate",
    "DirectScorer",
    "Exemplar",
    "JudgeOutput",
    "LabelledPairs",
    "LabellingReport",
    "PairwiseJudge",
    "PairwiseTemplate",
    "Principle",
    "RateEstimate",
    "SKIP_REASONS",
    "ScoreOutput",
    "ScoreTemplate",
    "TextModel",
    "answer_preference",
    "bootstrap_ci",
    "bradley_terry_ratings",
    "check_placeholders",
    "cohens_kappa",
    "combine_labelers",
    "consensus",
    "constitutional_preferences",
    "critique_revision",
    "debias_position",
    "default_constitution",
    "elo_ratings",
    "expected_score",
    "fleiss_kappa",
    "harmless_rate",
    "judge_win_rate",
    "label_preferences",
    "labeler_alignment",
    "load_constitution",
    "load_exemplars",
    "parse_constitution",
    "placeholders",
    "position_bias",
    "preference_records",
    "rating_table",
    "rl_cai_pairs",
    "sample_pairs",
    "score_distribution",
    "single_token_id",
    "sl_cai_records",
    "soft_to_preference_label",
    "tournament",
    "win_rate",
    "write_jsonl",
]
