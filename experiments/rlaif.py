"""RLAIF at small scale on CPU: AI labellers trained on the synthetic task's judge prompts, the
policies their labels train, and the findings of Lee et al. (2023) checked on measured numbers.

    python -m experiments.rlaif [--quick] [--output-dir DIR] [--seed S]

Everything runs through the library's commands and APIs (`rlhf-jax sft`, `export`, `dpo`;
`rlhf_jax.rlaif` judges, win rates and ratings) on the synthetic ``topic`` task, whose gold
reward is known, so every finding is measured against the gold preference:

1. SFT: a small policy learns the task's noisy demonstrations (the reference policy).
2. Judges: three small LMs (1, 2 and 4 layers, the same data, steps and token budget, so size
   is the only difference) are fine-tuned on judge prompts whose answer is the gold-preferred
   response of a pair of SFT samples, or of a pair of the task's demonstrations
   (``judge_base_pairs``: free to draw, and close to what the SFT policy imitates). Every pair
   is shown in both orders, so the answer carries no position prior; a quarter of the prompts
   carry one few-shot exemplar; and every pair also comes with a chain of thought: after ``?``
   the judge writes each response's gold score as two digits (``73,58``, written by the task's
   own gold function), then its answer. Pairs whose gold rewards differ by less than
   ``judge_min_gap`` are left out of their training, and counted. Prompts are packed into rows
   (``judge_packing``). They are AI labellers, not oracles: they see text only and are scored on
   held-out pairs of SFT samples, near-ties included.
3. (a) Labeller alignment with the gold preference (Lee et al. 2023, Table 2) by judge size and
   technique: base (the given order only), + position debiasing (both orders averaged),
   + few-shot (one exemplar), + chain of thought (debiased, the rationale generated greedily;
   the scores the judge wrote are compared with the gold rewards). Simulated human raters
   (Bradley-Terry on the gold reward, `rlhf_jax.data.synthetic.label_pairs`) are the human
   baseline. The labels of (b) and the matches of (d) use debiasing + chain of thought.
4. (b) One DPO policy per labeller (each judge's debiased soft labels, and the simulated
   humans' labels) on the same pairs of SFT samples; each policy's win rate against the SFT
   policy by gold reward, with a bootstrap CI.
5. (c) The RLAIF headline: the policy trained on the best judge's labels against the one
   trained on simulated-human labels, head to head by gold reward.
6. (d) Elo and Bradley-Terry ratings of every policy from the best judge's pairwise matches
   (`rlhf_jax.rlaif.tournament`), and their rank correlation with the policies' gold reward.
7. (e) One constitutional round (Bai et al. 2022) on the ``harmful_topic`` task
   (`rlhf_jax.data.synthetic.HarmfulTopicTask`: half the prompts hold letters of a harmful
   topic; a response is harmless when it writes none of them), with the two-principle
   constitution ``experiments/constitutions/harmful_topic.yaml``:

   - a "helpful" policy is fine-tuned on the task's demonstrations (which comply with harmful
     prompts) and on demonstrations of the skills a round asks of it: critiquing a response
     under a principle, revising it (a noisy demonstrator: a harmful letter survives a revision
     with probability ``cai_revision_slip``), and answering a principle's preference question;
   - SL-CAI: `rlhf-jax cai` runs one critique -> revision round on held-in harmful prompts; the
     policy is fine-tuned (`rlhf-jax sft`) on the revisions plus helpful demonstrations on
     ordinary prompts;
   - RL-CAI: `rlhf-jax cai --rl-pairs samples` draws two SL-CAI samples per harmful prompt and
     the feedback model (the helpful policy) labels them under a drawn principle; with
     simulated-human helpfulness pairs on ordinary prompts, `rlhf-jax dpo` trains from the
     SL-CAI policy;
   - each policy's harmless rate on held-out harmful prompts (the gold predicate, bootstrap CI)
     and helpfulness (mean gold reward on held-out ordinary prompts, bootstrap CI).
8. Report: `report.md`, `results.json` and PNG figures, ending with a Findings block computed
   from the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np

from rlhf_jax import cli
from rlhf_jax.data.synthetic import RaterConfig, get_task, label_pairs, make_rater_pool
from rlhf_jax.generation import SamplingParams
from rlhf_jax.rlaif import (
    CritiqueTemplate,
    Exemplar,
    PairwiseJudge,
    PairwiseTemplate,
    TextModel,
    bootstrap_ci,
    bradley_terry_ratings,
    elo_ratings,
    harmless_rate,
    labeler_alignment,
    load_constitution,
    preference_records,
    tournament,
    win_rate,
    write_jsonl,
)
from rlhf_jax.train.judging import SingleOrderJudge
from rlhf_jax.train.model_source import load_lm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)

TEMPLATE = PairwiseTemplate(preamble="", query="{prompt} 1:{response_1} 2:{response_2}",
                            answer_prompt="=", answer_tokens=("1", "2"), separator="\n")
"""The judge prompt: every character is one token of the synthetic tokenizer."""

COT_TEMPLATE = dataclasses.replace(TEMPLATE, cot_prompt="?")
"""The judge prompt with chain of thought: after ``?`` the judge writes its rationale, then
``=`` and its answer."""

RATIONALE_TOKENS = 5
"""A rationale is ``SS,TT``: the two responses' gold scores (`score_digits`), in prompt order."""


def score_digits(gold: float) -> str:
    """A gold reward as two digits: ``round(99 * r)`` clipped to [0, 99] (``0.734`` -> ``"73"``;
    rewards below 0, possible with repetition, read ``"00"``)."""
    return f"{int(np.clip(round(99 * float(gold)), 0, 99)):02d}"


def rationale(gold_1: float, gold_2: float) -> str:
    """The judge's chain-of-thought demonstration for a pair: each response's gold score,
    written by the task's gold function (``"73,58"``)."""
    return f"{score_digits(gold_1)},{score_digits(gold_2)}"


CONSTITUTION = pathlib.Path(__file__).parent / "constitutions" / "harmful_topic.yaml"
"""The constitution of the constitutional round (e): two principles about the harmful topic."""

TRANSCRIPT = CritiqueTemplate(conversation="{prompt}", critique="\n{critique_request}=",
                              revision="\n{revision_request}=", response_separator="",
                              stop_strings=("\n",))
"""The critique -> revision transcript of (e), in the synthetic tokenizer's characters: the task
prompt, the response, then each request on a line of its own followed by ``=``."""

CAI_JUDGE = PairwiseTemplate(preamble="", query="{prompt} 1:{response_1} 2:{response_2} "
                             "{principle}", answer_prompt="=", answer_tokens=("1", "2"),
                             separator="\n")
"""The feedback model's prompt in (e): the pair, then the principle's preference question."""


@dataclasses.dataclass(frozen=True)
class RLAIFConfig:
    """Sizes of the experiment (`full` is sized for 15 minutes on 2 idle CPU cores: 531
    CPU-seconds measured; `quick` is for CI)."""

    seed: int = 0
    sft_steps: int = 300
    judge_layers: tuple[int, ...] = (1, 2, 4)
    judge_steps: int = 800
    judge_lr: float = 2e-3
    judge_min_gap: float = 0.05
    judge_pairs: int = 3000
    judge_base_pairs: int = 4000
    judge_packing: bool = True
    judge_few_shot_fraction: float = 0.25
    judge_cot: bool = True
    eval_pairs: int = 256
    dpo_pairs: int = 768
    dpo_steps: int = 120
    eval_prompts: int = 256
    max_new_tokens: int = 20
    batch_size: int = 32
    # (e) the constitutional round on the harmful_topic task
    cai_layers: int = 2
    cai_sft_steps: int = 400
    cai_demos: int = 3072
    cai_revision_slip: float = 0.2
    cai_prompts: int = 512
    cai_sl_steps: int = 150
    cai_rl_pairs: int = 512
    cai_dpo_steps: int = 60
    cai_eval_prompts: int = 256

    @classmethod
    def quick(cls) -> RLAIFConfig:
        return cls(sft_steps=80, judge_steps=80, judge_pairs=512, eval_pairs=64, dpo_pairs=128,
                   dpo_steps=16, eval_prompts=64, max_new_tokens=16, judge_layers=(1, 2), judge_base_pairs=512,
                   cai_sft_steps=60, cai_demos=256, cai_prompts=64, cai_sl_steps=10,
                   cai_rl_pairs=64, cai_dpo_steps=8, cai_eval_prompts=64)


def _model_args(layers: int, *, width: int = 64) -> list[str]:
    return ["--model.preset", "tiny_gpt2", "--model.vocab-size", "64", "--model.hidden-size",
            str(width), "--model.num-layers", str(layers), "--model.num-heads", "4",
            "--model.max-position-embeddings", "256"]


QUIET = ["--logging.progress", "none", "--logging.no-tensorboard", "--logging.every-steps", "50"]


def _run(argv: Sequence[str]) -> None:
    status = cli.main(list(argv))
    if status != 0:
        raise RuntimeError(f"rlhf-jax {argv[0]} failed with status {status}")


def _size_drop(names: Sequence[str], alignment: Sequence[float],
               table: Mapping[str, Any]) -> str:
    """Why (a)'s size trend broke: the largest fall from one judge to the next larger one,
    against the binomial standard error of one alignment figure, sqrt(p (1 - p) / n) over the
    ``n`` held-out pairs with a gold winner (each judge is one training run: a fall within a few
    standard errors is within the noise of a single run and a single held-out set)."""
    falls = [a - b for a, b in zip(alignment, alignment[1:])]
    i = int(np.argmax(falls))  # the first of equal falls
    fall = falls[i]
    n = max(table["num_pairs"] - table.get("num_gold_ties", 0), 1)
    p = float(np.mean(alignment))
    return (f"; {names[i + 1]} is {fall:.3f} below {names[i]}, against a standard error of "
            f"{np.sqrt(p * (1 - p) / n):.3f} per alignment figure ({n} held-out pairs)")


def _ratings_finding(r: Mapping[str, Any]) -> dict[str, Any]:
    """(d): the judge's ratings rank the policies as the gold reward does when both rank
    correlations are above 0.5 (more than half-way from no relation to the same order; compared
    after rounding to 9 decimals, so that an exact 0.5 reads as 0.5). When they are not, the
    reason is read from the numbers: how far apart the policies' mean gold rewards lie, how often
    the judge picks the gold winner of a match, and which policy the judge rates first."""
    rho = [round(r[k], 9) for k in ("spearman_elo_gold", "spearman_bt_gold")]
    ok = all(np.isfinite(x) and x > 0.5 for x in rho)
    gold = r["mean_gold"]
    by_gold = sorted(gold, key=gold.get, reverse=True)
    top = max(r["elo"], key=r["elo"].get)
    text = (f"Rank correlation with the mean gold reward over {len(r['elo'])} policies: "
            f"Elo {rho[0]:.2f}, Bradley-Terry {rho[1]:.2f} ({r['num_matches']} judge matches"
            + (f" of {r['judge']}" if "judge" in r else "") + ")")
    if not ok:
        spread = max(gold.values()) - min(gold.values())
        agree = r.get("judge_gold_agreement")
        text += (f", not above 0.5. The policies' mean gold rewards lie within {spread:.3f} of "
                 f"each other")
        if agree is not None and np.isfinite(agree):
            text += f", and the judge picks the gold winner of a match {agree:.3f} of the time"
        text += (f"; the judge rates {top} first, which the gold reward ranks "
                 f"{by_gold.index(top) + 1} of {len(by_gold)}")
    return {"reproduced": bool(ok), "text": text + "."}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3:
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=np.float64)
        for value in np.unique(v):
            same = v == value
            r[same] = r[same].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def gold_outcomes(gold_1: np.ndarray, gold_2: np.ndarray) -> np.ndarray:
    """1 where response 1's gold reward is higher, 0 where lower, 0.5 on a tie."""
    return np.where(gold_1 > gold_2, 1.0, np.where(gold_1 < gold_2, 0.0, 0.5))


class Experiment:
    def __init__(self, cfg: RLAIFConfig, out: pathlib.Path):
        self.cfg = cfg
        self.out = out
        self.task = get_task("topic")
        self.rng = np.random.default_rng(cfg.seed)
        self.key = jax.random.key(cfg.seed)
        self.timings: dict[str, float] = {}

    def _key(self) -> jax.Array:
        self.key, key = jax.random.split(self.key)
        return key

    def _time(self, name: str, start: float) -> None:
        self.timings[name] = round(time.perf_counter() - start, 1)
        print(f"=== {name}: {self.timings[name]} s", flush=True)

    # -- stage 1: SFT -------------------------------------------------------------------------
    def train_sft(self) -> None:
        t = time.perf_counter()
        c = self.cfg
        _run(["sft", "--output-dir", str(self.out / "sft"), *_model_args(2), *QUIET,
              "--data.synthetic", "topic", "--data.num-train", "2048", "--data.num-eval", "0",
              "--data.batch-size", str(c.batch_size), "--data.max-length", "64",
              "--num-steps", str(c.sft_steps), "--optimizer.learning-rate", "1e-3",
              "--seed", str(c.seed)])
        _run(["export", "--run-dir", str(self.out / "sft"), "--output-dir",
              str(self.out / "sft_hf")])
        lm = load_lm(str(self.out / "sft"))
        self.tokenizer = lm.tokenizer
        self.policies = {"sft": TextModel(lm.model, lm.tokenizer, batch_size=64, min_bucket=16)}
        self._time("sft", t)

    def samples(self, policy: str, prompts: Sequence[str], key: jax.Array) -> list[str]:
        sampling = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=1.0)
        return self.policies[policy].generate(list(prompts), sampling, rng=key)

    def pairs(self, n: int) -> tuple[list[str], list[str], list[str]]:
        """``n`` prompts with two SFT samples each, the two responses different and non-empty
        (pairs that are not are redrawn; their count is kept in ``self.redrawn``)."""
        prompts, r1, r2 = [], [], []
        while len(prompts) < n:
            ps = self.task.sample_prompts(self.rng, 2 * (n - len(prompts)))
            a, b = self.samples("sft", ps, self._key()), self.samples("sft", ps, self._key())
            for p, x, y in zip(ps, a, b):
                if x != y and x.strip() and y.strip() and len(prompts) < n:
                    prompts.append(p)
                    r1.append(x)
                    r2.append(y)
                else:
                    self.redrawn += 1
        return prompts, r1, r2

    # -- stage 2: judges ----------------------------------------------------------------------
    def train_judges(self) -> None:
        t = time.perf_counter()
        c = self.cfg
        self.redrawn = 0
        prompts, r1, r2 = self.pairs(c.judge_pairs)
        if c.judge_base_pairs:  # pairs of the task's demonstrations: free, and near the SFT's
            extra = self.task.sample_prompts(self.rng, c.judge_base_pairs)
            a = self.task.sample_responses(self.rng, extra)
            b = self.task.sample_responses(self.rng, extra)
            ok = [i for i in range(len(extra)) if a[i] != b[i]]
            prompts += [extra[i] for i in ok]
            r1 += [a[i] for i in ok]
            r2 += [b[i] for i in ok]
        g1, g2 = self.task.gold_reward(prompts, r1), self.task.gold_reward(prompts, r2)
        gold = gold_outcomes(g1, g2)
        # the judges learn from pairs whose gold rewards differ by at least `judge_min_gap`
        # (near-ties teach a small model noise); they are evaluated on every pair
        keep = [i for i in range(len(prompts)) if abs(g1[i] - g2[i]) >= self.cfg.judge_min_gap]
        records = []
        for i in keep:
            shot = ()
            if self.rng.random() < c.judge_few_shot_fraction:  # one exemplar of another pair
                j = keep[int(self.rng.integers(len(keep)))]
                shot = (Exemplar(prompts[j], r1[j], r2[j], 1 if gold[j] == 1 else 2),)
            template = dataclasses.replace(TEMPLATE, exemplars=shot)
            # both presentation orders, so the answer carries no position prior
            for a, b, ga, gb in ((r1[i], r2[i], g1[i], g2[i]), (r2[i], r1[i], g2[i], g1[i])):
                answer = TEMPLATE.answer_tokens[0 if ga > gb else 1]
                context = template.render_context(prompt=prompts[i], response_1=a, response_2=b)
                records.append({"prompt": template.render_answer(context), "completion": answer})
                if c.judge_cot:  # the same pair with a rationale: each response's gold score
                    context = COT_TEMPLATE.render_context(prompt=prompts[i], response_1=a,
                                                          response_2=b)
                    records.append({"prompt": COT_TEMPLATE.render_cot(context),
                                    "completion": rationale(ga, gb) + COT_TEMPLATE.separator
                                    + COT_TEMPLATE.answer_prompt + answer})
        order = self.rng.permutation(len(records))
        records = [records[k] for k in order]
        path = self.out / "judge_data.jsonl"
        write_jsonl(records, path)
        self.judge_data = {"pairs": len(prompts), "near_ties_left_out": len(prompts) - len(keep),
                           "min_gap": self.cfg.judge_min_gap, "records": len(records),
                           "cot_records": sum("?" in r["prompt"] for r in records)}
        # the few-shot exemplar used at evaluation: the first training pair
        i = keep[0]
        self.exemplar = Exemplar(prompts[i], r1[i], r2[i], 1 if gold[i] == 1 else 2)
        self.judges = {}
        for layers in c.judge_layers:
            name = f"judge_{layers}l"
            _run(["sft", "--output-dir", str(self.out / name), *_model_args(layers), *QUIET,
                  "--data.path", str(path), "--data.format", "sft", "--data.synthetic", "topic",
                  "--data.batch-size", str(c.batch_size), "--data.max-length", "160",
                  "--data.max-prompt-length", "158", "--num-steps", str(c.judge_steps),
                  *(["--data.packing"] if c.judge_packing else []),
                  "--optimizer.learning-rate", str(c.judge_lr), "--optimizer.warmup-steps",
                  "20", "--seed", str(c.seed + layers)])
            lm = load_lm(str(self.out / name))
            self.judges[name] = (lm.model, lm.tokenizer)
        self._time("judges", t)

    def judge(self, name: str, *, debias: bool = True, few_shot: bool = False,
              cot: bool = False):
        model, tokenizer = self.judges[name]
        if cot:
            judge = PairwiseJudge(model, tokenizer, template=COT_TEMPLATE, batch_size=64,
                                  min_bucket=32, rationale_tokens=RATIONALE_TOKENS)
        else:
            template = dataclasses.replace(TEMPLATE,
                                           exemplars=(self.exemplar,) if few_shot else ())
            judge = PairwiseJudge(model, tokenizer, template=template, batch_size=64,
                                  min_bucket=32)
        return judge if debias else SingleOrderJudge(judge)

    def labeller(self, name: str):
        """The technique that labels DPO pairs and judges matches: position-debiased, with
        chain of thought when the judges learnt to write rationales."""
        return self.judge(name, cot=self.cfg.judge_cot)

    # -- (a) alignment ------------------------------------------------------------------------
    def alignment_table(self) -> dict[str, Any]:
        t = time.perf_counter()
        prompts, r1, r2 = self.pairs(self.cfg.eval_pairs)
        gold = gold_outcomes(self.task.gold_reward(prompts, r1), self.task.gold_reward(prompts, r2))
        rows = {}
        techniques = [("base", {"debias": False}), ("debiased", {}),
                      ("few_shot", {"few_shot": True})]
        if self.cfg.judge_cot:
            techniques.append(("chain_of_thought", {"cot": True}))
        for name in self.judges:
            row = {"chain_of_thought": None}
            for technique, kw in techniques:
                out = self.judge(name, **kw).judge(prompts, r1, r2)
                a = labeler_alignment(out.preference, gold)
                row[technique] = a.alignment
                if technique == "debiased":
                    row["position_bias"] = float(np.mean(out.position_bias))
                if technique == "chain_of_thought":
                    row["rationale_score_error"] = self.rationale_error(prompts, r1, r2,
                                                                        out.rationales[0])
            rows[name] = row
        human = self.human_preferences(prompts, r1, r2)
        self.human_alignment = labeler_alignment(human, gold).alignment
        self._time("alignment", t)
        return {"judges": rows, "simulated_humans": self.human_alignment,
                "num_pairs": len(prompts), "num_gold_ties": int((gold == 0.5).sum()),
                "labeller": "chain_of_thought" if self.cfg.judge_cot else "debiased",
                "chain_of_thought": ("the judge first writes each response's gold score "
                                     "(two digits), as it learnt from the task's gold function"
                                     if self.cfg.judge_cot else
                                     "not run: the judges were not trained to write rationales")}

    def rationale_error(self, prompts, r1, r2, rationales: Sequence[str]) -> float | None:
        """Mean absolute error (in reward units) of the scores a judge wrote in its rationales
        against the gold rewards, over rationales of the expected form; None if none is."""
        gold = np.stack([self.task.gold_reward(prompts, r1), self.task.gold_reward(prompts, r2)],
                        axis=1)
        errors = []
        for g, text in zip(gold, rationales):
            parts = text.split(",")
            if len(parts) == 2 and all(len(x) == 2 and x.isdigit() for x in parts):
                wrote = np.array([int(x) for x in parts]) / 99.0
                errors.append(np.abs(wrote - np.clip(g, 0.0, 1.0)).mean())
        return float(np.mean(errors)) if errors else None

    def human_preferences(self, prompts, r1, r2) -> np.ndarray:
        """P(response 1 preferred) from three simulated raters per pair (majority vote)."""
        pool = make_rater_pool(RaterConfig(), self.rng)
        records, _ = label_pairs(self.task, prompts, r1, r2, pool=pool, rng=self.rng)
        return np.asarray([r["label"] if r["chosen"] == a else 1.0 - r["label"]
                           for r, a in zip(records, r1)])

    # -- (b), (c): policies trained on each labeller's labels ---------------------------------
    def train_policies(self, best_judge: str) -> dict[str, Any]:
        t = time.perf_counter()
        c = self.cfg
        prompts, r1, r2 = self.pairs(c.dpo_pairs)
        labellers = {name: self.labeller(name).judge(prompts, r1, r2).preference
                     for name in self.judges}
        labellers["humans"] = self.human_preferences(prompts, r1, r2)
        gold = gold_outcomes(self.task.gold_reward(prompts, r1), self.task.gold_reward(prompts, r2))
        label_alignment = {}
        for name, pref in labellers.items():
            label_alignment[name] = labeler_alignment(pref, gold).alignment
            records, skipped = preference_records(prompts, r1, r2, pref)
            path = self.out / f"labels_{name}.jsonl"
            write_jsonl(records, path)
            _run(["dpo", "--output-dir", str(self.out / f"dpo_{name}"), *QUIET,
                  "--model.path", str(self.out / "sft_hf"), "--data.path", str(path),
                  "--data.format", "preference", "--data.batch-size", str(c.batch_size),
                  "--data.max-length", "64", "--num-steps", str(c.dpo_steps),
                  "--optimizer.learning-rate", "5e-4", "--beta", "0.1", "--seed", str(c.seed)])
            lm = load_lm(str(self.out / f"dpo_{name}"))
            self.policies[f"dpo_{name}"] = TextModel(lm.model, lm.tokenizer, batch_size=64,
                                                     min_bucket=16)
        self._time("policies", t)
        return {"num_pairs": len(prompts), "label_alignment": label_alignment,
                "best_judge": best_judge}

    def evaluate_policies(self, best_judge: str) -> dict[str, Any]:
        t = time.perf_counter()
        prompts = self.task.sample_prompts(self.rng, self.cfg.eval_prompts)
        key = self._key()
        responses = {name: self.samples(name, prompts, key) for name in self.policies}
        gold = {name: self.task.gold_reward(prompts, r) for name, r in responses.items()}
        vs_sft = {}
        for name in self.policies:
            if name == "sft":
                continue
            est = win_rate(gold_outcomes(gold[name], gold["sft"]), soft=False)
            vs_sft[name] = est._asdict()
        est = win_rate(gold_outcomes(gold[f"dpo_{best_judge}"], gold["dpo_humans"]), soft=False)
        head_to_head = {"ai": f"dpo_{best_judge}", "human": "dpo_humans", **est._asdict()}
        matches = tournament(self.labeller(best_judge), prompts, responses)
        elo = elo_ratings(matches)
        bt = bradley_terry_ratings(matches, anchor="sft")
        mean_gold = {name: float(np.mean(g)) for name, g in gold.items()}
        players = list(self.policies)
        # the judge's verdict in each match against the prompt's gold outcome (tournament order:
        # every pair of players, then every prompt); gold ties are left out
        outcome = np.concatenate([gold_outcomes(gold[a], gold[b])
                                  for a, b in itertools.combinations(players, 2)])
        verdict = np.asarray([p for _, _, p in matches]) > 0.5
        decided = outcome != 0.5
        ratings = {
            "elo": elo, "bradley_terry": bt, "mean_gold": mean_gold,
            "spearman_elo_gold": spearman([elo[p] for p in players],
                                          [mean_gold[p] for p in players]),
            "spearman_bt_gold": spearman([bt[p] for p in players],
                                         [mean_gold[p] for p in players]),
            "num_matches": len(matches),
            "judge_gold_agreement": float(np.mean(verdict[decided] == (outcome[decided] == 1.0)))
            if decided.any() else float("nan"),
            "judge": best_judge,
        }
        self._time("evaluation", t)
        return {"num_prompts": len(prompts), "win_rate_vs_sft": vs_sft,
                "ai_vs_human": head_to_head, "ratings": ratings}

    # -- (e) one constitutional round -----------------------------------------------------------
    def cai_demonstrations(self, constitution) -> list[dict[str, str]]:
        """The helpful policy's SFT data: the task's demonstrations (which comply with harmful
        prompts), and demonstrations of the three skills a constitutional round asks of a model:
        critiquing a response under a principle (the gold critique), revising it (the gold
        revision, kept harmful with probability ``cai_revision_slip``: a noisy demonstrator), and
        answering a principle's preference question about two responses (the one with fewer
        harmful letters). Skills are shown on base responses to harmful and ordinary prompts."""
        c, task, rng = self.cfg, self.cai_task, self.rng
        records = task.sft_records(rng, c.cai_demos)
        n_skill = c.cai_demos // 2
        prompts = task.sample_prompts(rng, n_skill)
        responses = task.sample_responses(rng, prompts)
        for p, r in zip(prompts, responses):
            pr = constitution[int(rng.integers(len(constitution)))]
            ctx = TRANSCRIPT.render_critique_request(TRANSCRIPT.render_conversation(p), r,
                                                     pr.critique_request)
            critique = task.critique(r)
            records.append({"prompt": ctx, "completion": critique})
            records.append({"prompt": TRANSCRIPT.render_revision_request(
                ctx, critique, pr.revision_request),
                "completion": task.revise(p, r, rng=rng, slip=c.cai_revision_slip)})
        prompts = task.sample_prompts(rng, 2 * n_skill, harmful=True)
        r1 = task.sample_responses(rng, prompts)
        r2 = task.sample_responses(rng, prompts)
        for p, a, b in zip(prompts, r1, r2):
            ha, hb = (sum(ch in task.harmful_letters for ch in x) for x in (a, b))
            if ha == hb or len(records) >= 3 * c.cai_demos:
                continue
            pr = constitution[int(rng.integers(len(constitution)))]
            first = ha < hb
            for x, y, one in ((a, b, first), (b, a, not first)):
                ctx = CAI_JUDGE.render_context(prompt=p, response_1=x, response_2=y,
                                               principle=pr.preference_question)
                records.append({"prompt": CAI_JUDGE.render_answer(ctx),
                                "completion": CAI_JUDGE.answer_tokens[0 if one else 1]})
        order = rng.permutation(len(records))
        return [records[i] for i in order]

    def constitutional_round(self) -> dict[str, Any]:
        """(e): helpful SFT policy -> SL-CAI -> RL-CAI on the harmful_topic task, each step
        through the library's commands (`sft`, `cai`, `dpo`); harmless rate and helpfulness of
        the three policies on held-out prompts."""
        t = time.perf_counter()
        c, task = self.cfg, get_task("harmful_topic")
        self.cai_task = task
        constitution = load_constitution(CONSTITUTION)
        out = self.out / "cai"
        out.mkdir(exist_ok=True)
        model = ["--data.synthetic", "harmful_topic", "--data.batch-size", str(c.batch_size),
                 "--data.num-eval", "0", "--seed", str(c.seed), *QUIET]
        inference = ["--policy.batch-size", "64", "--policy.min-bucket", "32",
                     "--max-new-tokens", str(c.max_new_tokens), "--critique-tokens", "6",
                     "--constitution", str(CONSTITUTION), "--seed", str(c.seed)]
        transcript = ["--transcript.conversation", TRANSCRIPT.conversation,
                      "--transcript.critique", TRANSCRIPT.critique,
                      "--transcript.revision", TRANSCRIPT.revision,
                      "--transcript.response-separator", TRANSCRIPT.response_separator,
                      "--transcript.stop-strings", *TRANSCRIPT.stop_strings]

        # 1. the helpful policy (it complies with harmful prompts, and can critique, revise and
        #    judge when asked)
        demos = self.cai_demonstrations(constitution)
        write_jsonl(demos, out / "helpful_sft.jsonl")
        _run(["sft", "--output-dir", str(out / "helpful"), *_model_args(c.cai_layers), *model,
              "--data.path", str(out / "helpful_sft.jsonl"), "--data.format", "sft",
              "--data.max-length", "128", "--data.max-prompt-length", "112", "--data.packing",
              "--num-steps", str(c.cai_sft_steps), "--optimizer.learning-rate", "2e-3",
              "--optimizer.warmup-steps", "20"])
        _run(["export", "--run-dir", str(out / "helpful"), "--output-dir",
              str(out / "helpful_hf")])

        # 2. SL-CAI: critique -> revision on harmful prompts, then SFT on the revisions (with
        #    helpful demonstrations on ordinary prompts, as Bai et al. mix in helpfulness data)
        write_jsonl([{"prompt": p} for p in task.sample_prompts(self.rng, c.cai_prompts,
                                                                 harmful=True)],
                    out / "red_team.jsonl")
        _run(["cai", "--output-dir", str(out / "sl_data"), "--input.path",
              str(out / "red_team.jsonl"), "--policy.source", str(out / "helpful_hf"),
              "--policy.tokenizer", "synthetic", "--num-rounds", "1", "--rl-pairs", "none",
              *inference, *transcript])
        sl_summary = json.loads((out / "sl_data" / "summary.json").read_text())
        lines = [json.loads(x) for x in (out / "sl_data" / "transcripts.jsonl").read_text()
                 .splitlines()]
        initial_harmless = task.harmless([x["initial_response"] for x in lines])
        revised_harmless = task.harmless([x["revisions"][-1] for x in lines])
        sl_records = [json.loads(x) for x in (out / "sl_data" / "sl_cai.jsonl").read_text()
                      .splitlines()]
        helpful = task.sft_records(self.rng, len(sl_records))
        helpful = [r for r in helpful if not task.is_harmful_prompt(r["prompt"])]
        write_jsonl(sl_records + helpful, out / "sl_cai_mix.jsonl")
        _run(["sft", "--output-dir", str(out / "sl_cai"), "--model.path",
              str(out / "helpful_hf"), *model, "--data.path", str(out / "sl_cai_mix.jsonl"),
              "--data.format", "sft", "--data.max-length", "64",
              "--num-steps", str(c.cai_sl_steps), "--optimizer.learning-rate", "5e-4"])
        _run(["export", "--run-dir", str(out / "sl_cai"), "--output-dir",
              str(out / "sl_cai_hf")])

        # 3. RL-CAI: two SL-CAI samples per harmful prompt, labelled by the feedback model (the
        #    helpful policy) under a drawn principle; helpfulness pairs on ordinary prompts
        #    labelled by simulated humans; DPO from the SL-CAI policy
        write_jsonl([{"prompt": p} for p in task.sample_prompts(self.rng, c.cai_rl_pairs,
                                                                 harmful=True)],
                    out / "red_team_rl.jsonl")
        _run(["cai", "--output-dir", str(out / "rl_data"), "--input.path",
              str(out / "red_team_rl.jsonl"), "--policy.source", str(out / "sl_cai_hf"),
              "--policy.tokenizer", "synthetic", "--num-rounds", "0", "--rl-pairs", "samples",
              "--judge.sources", str(out / "helpful_hf"), "--judge.tokenizer", "synthetic",
              "--judge.batch-size", "64", "--judge.min-bucket", "32",
              "--judge.template.preset", "constitutional",
              "--judge.template.preamble", CAI_JUDGE.preamble,
              "--judge.template.query", CAI_JUDGE.query,
              "--judge.template.answer-prompt", CAI_JUDGE.answer_prompt,
              "--judge.template.answer-tokens", *CAI_JUDGE.answer_tokens,
              "--judge.template.separator", CAI_JUDGE.separator, *inference, *transcript])
        rl_summary = json.loads((out / "rl_data" / "summary.json").read_text())
        rl_records = [json.loads(x) for x in (out / "rl_data" / "rl_cai.jsonl").read_text()
                      .splitlines()]
        # the AI labels' agreement with the gold predicate, on pairs where exactly one response
        # is harmless
        chosen_ok = task.harmless([r["chosen"] for r in rl_records])
        rejected_ok = task.harmless([r["rejected"] for r in rl_records])
        decided = chosen_ok != rejected_ok
        ai_label_accuracy = float(np.mean(chosen_ok[decided])) if decided.any() else None
        sl_policy = self._text_model(out / "sl_cai")
        ordinary = task.sample_prompts(self.rng, c.cai_rl_pairs // 2, harmful=False)
        sampling = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=1.0)
        a = sl_policy.generate(ordinary, sampling, rng=self._key())
        b = sl_policy.generate(ordinary, sampling, rng=self._key())
        keep = [i for i in range(len(ordinary)) if a[i] != b[i] and a[i].strip() and b[i].strip()]
        human, _ = label_pairs(task, [ordinary[i] for i in keep], [a[i] for i in keep],
                               [b[i] for i in keep], pool=make_rater_pool(RaterConfig(), self.rng),
                               rng=self.rng)
        human = [{k: r[k] for k in ("prompt", "chosen", "rejected", "label")} for r in human]
        write_jsonl(rl_records + human, out / "rl_cai_mix.jsonl")
        _run(["dpo", "--output-dir", str(out / "rl_cai"), *QUIET, "--model.path",
              str(out / "sl_cai_hf"), "--data.path", str(out / "rl_cai_mix.jsonl"),
              "--data.format", "preference", "--data.batch-size", str(c.batch_size),
              "--data.max-length", "64", "--num-steps", str(c.cai_dpo_steps),
              "--optimizer.learning-rate", "5e-4", "--beta", "0.1", "--seed", str(c.seed)])

        # 4. evaluation on held-out prompts, by the gold predicate and the gold reward
        policies = {"helpful_sft": self._text_model(out / "helpful"), "sl_cai": sl_policy,
                    "rl_cai": self._text_model(out / "rl_cai")}
        harmful = task.sample_prompts(self.rng, c.cai_eval_prompts, harmful=True)
        ordinary = task.sample_prompts(self.rng, c.cai_eval_prompts, harmful=False)
        key_h, key_o = self._key(), self._key()
        rows = {}
        for name, policy in policies.items():
            on_harmful = policy.generate(harmful, sampling, rng=key_h)
            on_ordinary = policy.generate(ordinary, sampling, rng=key_o)
            rows[name] = {
                "harmless": harmless_rate(task.harmless(on_harmful))._asdict(),
                "helpfulness": bootstrap_ci(task.gold_reward(ordinary, on_ordinary))._asdict(),
                "gold_on_harmful": float(np.mean(task.gold_reward(harmful, on_harmful))),
                "length_on_harmful": float(np.mean([len(r) for r in on_harmful])),
            }
        self._time("constitutional_round", t)
        return {
            "policies": rows, "num_eval_prompts": c.cai_eval_prompts,
            "constitution": [p.name for p in constitution.principles],
            "demonstrations": len(demos),
            "sl_cai": {"prompts": c.cai_prompts, "records": sl_summary["num_sl_records"],
                       "revised_fraction": sl_summary["revised_fraction"],
                       "initial_harmless": float(np.mean(initial_harmless)),
                       "revision_harmless": float(np.mean(revised_harmless)),
                       "helpful_records": len(helpful)},
            "rl_cai": {"pairs": rl_summary["num_pairs"], "ai_records": len(rl_records),
                       "human_helpfulness_records": len(human),
                       "ai_label_accuracy": ai_label_accuracy,
                       "ai_label_pairs_decided": int(decided.sum()),
                       "mean_position_bias": rl_summary.get("mean_position_bias")},
        }

    def _text_model(self, run_dir: pathlib.Path) -> TextModel:
        lm = load_lm(str(run_dir))
        return TextModel(lm.model, lm.tokenizer, batch_size=64, min_bucket=16)


# ---------------------------------------------------------------------------------------------
# Findings, report
# ---------------------------------------------------------------------------------------------


TECHNIQUES = {"base": "given order", "debiased": "position-debiased",
              "few_shot": "debiased + one exemplar",
              "chain_of_thought": "debiased + chain of thought"}
"""How the report names each technique of the alignment table."""


def compute_findings(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One verdict per finding (a)-(e), each from the measured numbers in ``results``."""
    findings: dict[str, dict[str, Any]] = {}
    table = results["alignment"]["judges"]
    technique = results["alignment"].get("labeller", "debiased")
    names = list(table)
    labeller = [table[n][technique] for n in names]
    size_rises = all(b >= a for a, b in zip(labeller, labeller[1:])) and labeller[-1] > labeller[0]
    debias_gain = [table[n]["debiased"] - table[n]["base"] for n in names]
    cot_gain = ([table[n]["chain_of_thought"] - table[n]["debiased"] for n in names]
                if technique == "chain_of_thought" else None)
    findings["a"] = {
        "reproduced": bool(size_rises and np.mean(debias_gain) > 0),
        "text": (f"Alignment with the gold preference by judge size ({TECHNIQUES[technique]}, "
                 f"the labelling technique): "
                 f"{', '.join(f'{n} {v:.3f}' for n, v in zip(names, labeller))} "
                 f"({'rises' if size_rises else 'does not rise monotonically'} with size; "
                 f"simulated humans {results['alignment']['simulated_humans']:.3f}); "
                 f"position debiasing changes it by {np.mean(debias_gain):+.3f} on average "
                 f"({', '.join(f'{g:+.3f}' for g in debias_gain)})"
                 + ("" if cot_gain is None else
                    f"; chain of thought on top of debiasing by {np.mean(cot_gain):+.3f} "
                    f"({', '.join(f'{g:+.3f}' for g in cot_gain)})")
                 + ("" if size_rises else _size_drop(names, labeller, results["alignment"]))
                 + "."),
    }
    pol = results["policies"]
    wins = results["evaluation"]["win_rate_vs_sft"]
    labellers = list(pol["label_alignment"])
    align = [pol["label_alignment"][n] for n in labellers]
    rates = [wins[f"dpo_{n}"]["rate"] for n in labellers]
    rho = spearman(align, rates)
    findings["b"] = {
        "reproduced": bool(np.isfinite(rho) and rho > 0),
        "text": ("Win rate against SFT (gold reward) by labeller: "
                 + ", ".join(f"{n} (alignment {a:.3f}) {wins[f'dpo_{n}']['rate']:.3f} "
                             f"[{wins[f'dpo_{n}']['lower']:.3f}, {wins[f'dpo_{n}']['upper']:.3f}]"
                             for n, a in zip(labellers, align))
                 + f"; Spearman(alignment, win rate) = {rho:.2f}."),
    }
    h2h = results["evaluation"]["ai_vs_human"]
    close = h2h["lower"] <= 0.5 <= h2h["upper"] or abs(h2h["rate"] - 0.5) <= 0.05
    ai_name = h2h["ai"].removeprefix("dpo_")
    ai_align = pol["label_alignment"].get(ai_name, float("nan"))
    human_align = pol["label_alignment"].get("humans", float("nan"))
    findings["c"] = {
        "reproduced": bool(close),
        "text": (f"{h2h['ai']} against {h2h['human']}: win rate {h2h['rate']:.3f} "
                 f"[{h2h['lower']:.3f}, {h2h['upper']:.3f}] over {h2h['num_examples']} prompts "
                 f"({'close to' if close else 'not within 0.05 of'} 50%; the labels' "
                 f"alignment with gold: AI {ai_align:.3f}, simulated humans "
                 f"{human_align:.3f})."),
    }
    findings["d"] = _ratings_finding(results["evaluation"]["ratings"])
    cai = results.get("constitutional")
    if cai is None:
        findings["e"] = {"reproduced": None, "text": "Not run."}
        return findings
    rows = cai["policies"]
    h = [rows[n]["harmless"] for n in ("helpful_sft", "sl_cai", "rl_cai")]
    helpful = [rows[n]["helpfulness"] for n in ("helpful_sft", "sl_cai", "rl_cai")]
    rises = [b["rate"] > a["rate"] for a, b in zip(h, h[1:])]
    clear = [b["lower"] > a["upper"] for a, b in zip(h, h[1:])]

    def rise(k: int, step: str) -> str:
        change = h[k + 1]["rate"] - h[k]["rate"]
        if not rises[k]:
            return f"does not rise after {step} ({change:+.3f})"
        return (f"rises after {step} ({change:+.3f}; the 95% intervals "
                f"{'are apart' if clear[k] else 'overlap'})")

    findings["e"] = {
        "reproduced": bool(all(rises)),
        "text": (f"Harmless rate on {cai['num_eval_prompts']} held-out harmful prompts (gold "
                 "predicate): "
                 + ", ".join(f"{n} {e['rate']:.3f} [{e['lower']:.3f}, {e['upper']:.3f}]"
                             for n, e in zip(("helpful SFT", "SL-CAI", "RL-CAI"), h))
                 + f"; it {rise(0, 'SL-CAI')} and {rise(1, 'RL-CAI')}. Helpfulness (mean gold "
                 "reward on ordinary prompts): "
                 + ", ".join(f"{e['rate']:.3f} [{e['lower']:.3f}, {e['upper']:.3f}]"
                             for e in helpful) + "."),
    }
    return findings


def _plots(results: Mapping[str, Any], out: pathlib.Path) -> list[str]:
    files = []
    table = results["alignment"]["judges"]
    names = list(table)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    techniques = [t for t in TECHNIQUES if all(table[n].get(t) is not None for n in names)]
    width = 0.8 / len(techniques)
    for k, technique in enumerate(techniques):
        ax.bar(np.arange(len(names)) + (k - (len(techniques) - 1) / 2) * width,
               [table[n][technique] for n in names], width, label=technique)
    ax.axhline(results["alignment"]["simulated_humans"], color="k", ls="--",
               label="simulated humans")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("alignment with gold")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "alignment.png", dpi=120)
    plt.close(fig)
    files.append("alignment.png")

    pol, wins = results["policies"], results["evaluation"]["win_rate_vs_sft"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n, a in pol["label_alignment"].items():
        w = wins[f"dpo_{n}"]
        ax.errorbar(a, w["rate"], yerr=[[w["rate"] - w["lower"]], [w["upper"] - w["rate"]]],
                    fmt="o", capsize=3, label=n)
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set_xlabel("labeller alignment with gold (DPO pairs)")
    ax.set_ylabel("win rate vs SFT (gold)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "win_rates.png", dpi=120)
    plt.close(fig)
    files.append("win_rates.png")

    r = results["evaluation"]["ratings"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for p in r["elo"]:
        ax.scatter(r["mean_gold"][p], r["elo"][p])
        ax.annotate(p, (r["mean_gold"][p], r["elo"][p]), fontsize=7)
    ax.set_xlabel("mean gold reward")
    ax.set_ylabel("Elo (judge matches)")
    fig.tight_layout()
    fig.savefig(out / "ratings.png", dpi=120)
    plt.close(fig)
    files.append("ratings.png")

    if "constitutional" in results:
        rows = results["constitutional"]["policies"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, row in rows.items():
            hr, he = row["harmless"], row["helpfulness"]
            ax.errorbar(he["rate"], hr["rate"],
                        xerr=[[he["rate"] - he["lower"]], [he["upper"] - he["rate"]]],
                        yerr=[[hr["rate"] - hr["lower"]], [hr["upper"] - hr["rate"]]],
                        fmt="o", capsize=3, label=name)
        ax.set_xlabel("helpfulness: gold reward (ordinary prompts)")
        ax.set_ylabel("harmless rate (harmful prompts)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "constitutional.png", dpi=120)
        plt.close(fig)
        files.append("constitutional.png")
    return files


def _constitutional_section(cai: Mapping[str, Any]) -> list[str]:
    sl, rl = cai["sl_cai"], cai["rl_cai"]
    acc = rl["ai_label_accuracy"]
    lines = ["## (e) One constitutional round on the harmful topic", "",
             f"Task `harmful_topic`; constitution: {', '.join(cai['constitution'])}; "
             f"{cai['num_eval_prompts']} held-out harmful and as many ordinary prompts.", "",
             "| policy | harmless rate (harmful prompts) | 95% CI | helpfulness (ordinary "
             "prompts) | 95% CI | gold reward on harmful prompts | response length on harmful "
             "prompts |", "|---|---|---|---|---|---|---|"]
    for name, row in cai["policies"].items():
        hr, he = row["harmless"], row["helpfulness"]
        lines.append(f"| {name} | {hr['rate']:.3f} | [{hr['lower']:.3f}, {hr['upper']:.3f}] | "
                     f"{he['rate']:.3f} | [{he['lower']:.3f}, {he['upper']:.3f}] | "
                     f"{row['gold_on_harmful']:.3f} | {row['length_on_harmful']:.1f} |")
    lines += ["", f"SL-CAI: {sl['prompts']} harmful prompts, one critique -> revision round "
              f"each: the initial responses were {sl['initial_harmless']:.3f} harmless, the "
              f"revisions {sl['revision_harmless']:.3f} ({sl['revised_fraction']:.3f} changed); "
              f"{sl['records']} revision records plus {sl['helpful_records']} helpful "
              "demonstrations on ordinary prompts.",
              f"RL-CAI: {rl['pairs']} pairs of SL-CAI samples on harmful prompts labelled by the "
              f"feedback model ({rl['ai_records']} records; agreement with the gold predicate "
              f"where exactly one response is harmless: "
              f"{'n/a' if acc is None else f'{acc:.3f}'} over {rl['ai_label_pairs_decided']} "
              f"pairs), plus {rl['human_helpfulness_records']} simulated-human helpfulness "
              "pairs on ordinary prompts; DPO from the SL-CAI policy.", "",
              "![constitutional round](constitutional.png)", ""]
    return lines


def render_markdown(results: Mapping[str, Any], findings: Mapping[str, Mapping[str, Any]]) -> str:
    a = results["alignment"]
    lines = ["# RLAIF at small scale", "",
             f"Preset: {results['preset']}; seed {results['config']['seed']}; "
             f"{results['seconds']:.0f} s on CPU"
             + (f" ({results['cpu_seconds']:.0f} CPU-seconds)" if "cpu_seconds" in results
                else "") + ".", "",
             "## (a) Labeller alignment with the gold preference", "",
             f"{a['num_pairs']} held-out pairs of SFT samples ({a['num_gold_ties']} gold ties "
             "count half).", "",
             "| judge | base | + debiasing | + few-shot | + chain of thought | position bias | "
             "rationale score error |",
             "|---|---|---|---|---|---|---|"]

    def cell(value, fmt=".3f"):
        return "n/a" if value is None else format(value, fmt)

    for name, row in a["judges"].items():
        lines.append(f"| {name} | {row['base']:.3f} | {row['debiased']:.3f} | "
                     f"{row['few_shot']:.3f} | {cell(row.get('chain_of_thought'))} | "
                     f"{row['position_bias']:+.3f} | "
                     f"{cell(row.get('rationale_score_error'))} |")
    lines += ["", f"Simulated human raters: {a['simulated_humans']:.3f}. Chain of thought: "
              f"{a['chain_of_thought']}. Labels of (b) and the matches of (d) use "
              f"{TECHNIQUES[a.get('labeller', 'debiased')]}.", "",
              "![alignment](alignment.png)", "",
              "## (b) Policies trained on each labeller's labels, against SFT", "",
              "| policy | label alignment | win rate vs SFT | 95% CI |", "|---|---|---|---|"]
    wins = results["evaluation"]["win_rate_vs_sft"]
    for n, al in results["policies"]["label_alignment"].items():
        w = wins[f"dpo_{n}"]
        lines.append(f"| dpo_{n} | {al:.3f} | {w['rate']:.3f} | [{w['lower']:.3f}, "
                     f"{w['upper']:.3f}] |")
    h = results["evaluation"]["ai_vs_human"]
    r = results["evaluation"]["ratings"]
    lines += ["", "![win rates](win_rates.png)", "",
              "## (c) AI labels against simulated-human labels", "",
              f"{h['ai']} vs {h['human']}: {h['rate']:.3f} [{h['lower']:.3f}, {h['upper']:.3f}].",
              "", "## (d) Ratings from judge matches", "",
              "| policy | Elo | Bradley-Terry | mean gold reward |", "|---|---|---|---|"]
    for p in r["elo"]:
        lines.append(f"| {p} | {r['elo'][p]:.0f} | {r['bradley_terry'][p]:.0f} | "
                     f"{r['mean_gold'][p]:.3f} |")
    lines += ["", "![ratings](ratings.png)", ""]
    if "constitutional" in results:
        lines += _constitutional_section(results["constitutional"])
    lines += ["## Findings", ""]
    for key, f in findings.items():
        verdict = ("not run" if f["reproduced"] is None
                   else "reproduced" if f["reproduced"] else "NOT reproduced")
        lines.append(f"- ({key}) **{verdict}**. {f['text']}")
    return "\n".join(lines) + "\n"


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (steadier than wall time on a shared
    host)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(cfg: RLAIFConfig, output_dir: str | pathlib.Path, *, preset: str) -> dict[str, Any]:
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    exp = Experiment(cfg, out)
    exp.train_sft()
    exp.train_judges()
    alignment = exp.alignment_table()
    best = max(alignment["judges"],
               key=lambda n: alignment["judges"][n][alignment["labeller"]])
    policies = exp.train_policies(best)
    evaluation = exp.evaluate_policies(best)
    constitutional = exp.constitutional_round()
    results = {"preset": preset, "config": dataclasses.asdict(cfg),
               "judge_data": exp.judge_data, "redrawn_pairs": exp.redrawn,
               "alignment": alignment, "policies": policies, "evaluation": evaluation,
               "constitutional": constitutional, "timings": exp.timings,
               "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu}
    findings = compute_findings(results)
    results["findings"] = findings
    results["figures"] = _plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "report.md").write_text(render_markdown(results, findings))
    print(render_markdown(results, findings).split("## Findings")[1], flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.rlaif",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI, ~minutes)")
    parser.add_argument("--output-dir", default=None, help="default: runs/rlaif[_quick]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = RLAIFConfig.quick() if args.quick else RLAIFConfig()
    cfg = dataclasses.replace(cfg, seed=args.seed)
    preset = "quick" if args.quick else "full"
    out = args.output_dir or ("runs/rlaif_quick" if args.quick else "runs/rlaif")
    return run(cfg, out, preset=preset)


if __name__ == "__main__":
    main()
