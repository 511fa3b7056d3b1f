"""Personal data typed at the prompts becomes the gateway's shape; a slip says the fix."""

from __future__ import annotations

import pytest

from provisioning.private_input import PrivateInputError, from_json, from_prompts


def _answers(*given: str):  # type: ignore[no-untyped-def]
    queue = list(given)
    return lambda question, default: queue.pop(0) or default


def test_prompts_fill_the_fields_given_and_leave_the_rest_out() -> None:
    ask = _answers("12 Sejong-daero", "", "37.5665", "126.978", "+821012345678", "victim",
                   "Kim", "+821098765432", "", "", "")  # fmt: skip
    assert from_prompts(ask) == {
        "address": "12 Sejong-daero",
        "location": {"lat": 37.5665, "lon": 126.978},
        "phones": [
            {"role": "victim", "name": "Kim", "number": "+821012345678"},
            {"role": "guardian", "name": "", "number": "+821098765432"},
        ],
    }


def test_half_a_location_or_an_unknown_role_or_nothing_names_the_fix() -> None:
    with pytest.raises(PrivateInputError, match="give both as decimal degrees"):
        from_prompts(_answers("", "", "37.5", "", ""))
    with pytest.raises(PrivateInputError, match="one of victim, guardian, other"):
        from_prompts(_answers("", "", "", "", "+8210", "mother"))
    with pytest.raises(PrivateInputError, match="nothing was entered"):
        from_prompts(_answers("", "", "", "", ""))
    with pytest.raises(PrivateInputError, match="send one like"):
        from_json("[]")
