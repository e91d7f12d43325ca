"""Full-text search of Chinese pages without jieba.

Sphinx's Chinese search (sphinx.search.zh) indexes Chinese words only when the optional `jieba`
segmenter is installed; without it, only the Latin words of a Chinese page are searchable, so a
search for 交叉注意力 finds nothing in the text. This splitter also indexes every run of Chinese
characters and each pair of characters in it: the browser's search matches a two-character query
exactly and a longer one as a part of an indexed run (searchtools.js's partial matching).
"""
from __future__ import annotations

import re

from sphinx.search import languages
from sphinx.search.zh import SearchChinese

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


class SearchChineseRuns(SearchChinese):
    def split(self, input: str) -> list[str]:
        words = super().split(input)  # jieba's words, if it is installed, and the Latin words
        for run in _HAN.findall(input):
            words.append(run)
            if len(run) > 2:
                words.extend(run[i:i + 2] for i in range(len(run) - 1))
        return words


def setup(app):
    languages["zh"] = SearchChineseRuns
    return {"parallel_read_safe": True, "parallel_write_safe": True}
