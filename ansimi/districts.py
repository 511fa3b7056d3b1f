"""Seoul's 25 autonomous districts (gu), the unit the CCTV control centres are organised by.

A device's `district` and a centre's `districts` use the romanised code below. A typo in a
config file would silently route nobody's alerts to that centre, so every configured name
is checked against this list, and a near miss is answered with the nearest code.
"""

from __future__ import annotations

import difflib
from typing import Final

from ansimi.errors import AnsimiError

# code -> Korean name, in the order of the city's official district numbering
SEOUL_DISTRICTS: Final[dict[str, str]] = {
    "jongno": "종로구",
    "jung": "중구",
    "yongsan": "용산구",
    "seongdong": "성동구",
    "gwangjin": "광진구",
    "dongdaemun": "동대문구",
    "jungnang": "중랑구",
    "seongbuk": "성북구",
    "gangbuk": "강북구",
    "dobong": "도봉구",
    "nowon": "노원구",
    "eunpyeong": "은평구",
    "seodaemun": "서대문구",
    "mapo": "마포구",
    "yangcheon": "양천구",
    "gangseo": "강서구",
    "guro": "구로구",
    "geumcheon": "금천구",
    "yeongdeungpo": "영등포구",
    "dongjak": "동작구",
    "gwanak": "관악구",
    "seocho": "서초구",
    "gangnam": "강남구",
    "songpa": "송파구",
    "gangdong": "강동구",
}

# A centre that serves every district (the central centre).
ALL: Final = "*"


class UnknownDistrict(AnsimiError, ValueError):
    def __init__(self, name: str) -> None:
        self.name = name
        near = difflib.get_close_matches(name.lower(), SEOUL_DISTRICTS, n=1, cutoff=0.5)
        hint = f'did you mean "{near[0]}"?' if near else "use a code from ansimi/districts.py"
        super().__init__(f'unknown district "{name}": {hint}')


def check_district(name: str, *, allow_all: bool = False) -> str:
    """`name` if it is a Seoul district code (or "*" where allowed), else UnknownDistrict."""
    if name in SEOUL_DISTRICTS or (allow_all and name == ALL):
        return name
    raise UnknownDistrict(name)
