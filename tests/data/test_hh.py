"""Anthropic HH-RLHF transcript splitting, on hand-written transcripts."""

import pytest

from rlhf_jax import data as D

H, A = "\n\nHuman:", "\n\nAssistant:"


class TestSplitHHTranscripts:
    def test_single_turn(self):
        chosen = f"{H} What is 2+2?{A} 4."
        rejected = f"{H} What is 2+2?{A} 5."
        prompt, c, r = D.split_hh_transcripts(chosen, rejected)
        assert prompt == f"{H} What is 2+2?{A}"
        assert (c, r) == (" 4.", " 5.")
        assert prompt + c == chosen and prompt + r == rejected

    def test_multi_turn_keeps_earlier_assistant_turns_in_prompt(self):
        history = f"{H} Hi{A} Hello! How can I help?{H} Tell me a joke"
        chosen = f"{history}{A} Why did the chicken cross the road?"
        rejected = f"{history}{A} No."
        split = D.split_hh_transcripts(chosen, rejected)
        assert split.prompt == f"{history}{A}"
        assert split.prompt.endswith(A) and split.prompt.count(A) == 2
        assert split.chosen == " Why did the chicken cross the road?"
        assert split.rejected == " No."

    def test_whitespace_is_kept_exactly(self):
        chosen = f"{H}  spaced  question \n{A}  answer with trailing newline\n"
        rejected = f"{H}  spaced  question \n{A}\tother "
        prompt, c, r = D.split_hh_transcripts(chosen, rejected)
        assert prompt == f"{H}  spaced  question \n{A}"
        assert c == "  answer with trailing newline\n"
        assert r == "\tother "

    def test_response_mentioning_roles_without_marker(self):
        chosen = f"{H} Quote it{A} He said Human: hi and Assistant: bye"
        rejected = f"{H} Quote it{A} No"
        prompt, c, _ = D.split_hh_transcripts(chosen, rejected)
        assert prompt == f"{H} Quote it{A}" and c == " He said Human: hi and Assistant: bye"

    def test_differing_prompts_rejected_with_reason(self):
        chosen = f"{H} What is 2+2?{A} 4."
        rejected = f"{H} What is 3+3?{A} 6."
        with pytest.raises(D.HHParseError, match="do not share a prompt.*character 17") as e:
            D.split_hh_transcripts(chosen, rejected)
        assert e.value.reason == "prompt_mismatch"

    def test_missing_final_assistant_turn(self):
        chosen = f"{H} Hi{A} Hello{H} Are you there?"
        rejected = f"{H} Hi{A} Hello{H} Are you there?{A} Yes"
        with pytest.raises(D.HHParseError, match="chosen transcript ends with a Human turn") as e:
            D.split_hh_transcripts(chosen, rejected)
        assert e.value.reason == "missing_assistant_turn"

    def test_no_assistant_turn_at_all(self):
        with pytest.raises(D.HHParseError, match="rejected transcript has no") as e:
            D.split_hh_transcripts(f"{H} Hi{A} Yo", f"{H} Hi")
        assert e.value.reason == "missing_assistant_turn"

    def test_no_human_turn(self):
        with pytest.raises(D.HHParseError, match="does not open with"):
            D.split_hh_transcripts(f"{A} Yo", f"{A} Hey")


class TestHHRecords:
    def test_parse_record(self):
        ex = D.parse_record(
            {"chosen": f"{H} Hi{A} Hello", "rejected": f"{H} Hi{A} Go away"},
            format="hh",
            origin="hh.jsonl:3",
        )
        assert isinstance(ex, D.PreferenceExample)
        assert ex.prompt == f"{H} Hi{A}" and ex.chosen == " Hello" and ex.rejected == " Go away"
        assert (ex.label, ex.margin) == (1.0, 0.0)

    @pytest.mark.parametrize(
        ("chosen", "rejected", "reason"),
        [
            (f"{H} Hi{A} Hello", f"{H} Hey{A} Hello", "prompt_mismatch"),
            (f"{H} Hi{A}  ", f"{H} Hi{A} No", "empty_response"),
            (f"{H} Hi{A} Same", f"{H} Hi{A} Same", "identical_responses"),
            (f"{H} Hi", f"{H} Hi{A} No", "missing_assistant_turn"),
        ],
    )
    def test_bad_rows_name_origin_and_reason(self, chosen, rejected, reason):
        with pytest.raises(D.RecordError, match=r"^hh\.jsonl:9: ") as e:
            D.parse_record({"chosen": chosen, "rejected": rejected}, format="hh", origin="hh.jsonl:9")
        assert e.value.reason == reason
        assert e.value.origin == "hh.jsonl:9"
