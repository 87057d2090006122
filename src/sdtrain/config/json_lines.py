"""Line numbers of the keys of a JSON document, so JSON blueprints get `file:line` errors too."""

from __future__ import annotations

import json

from sdtrain.config.toml_source import KeyPath

_WS = " \t\r\n"


def locate_json_keys(text: str) -> dict[KeyPath, int]:
    """Map each key path (list items indexed) to the 1-based line where it starts.

    A tolerant single pass over already-valid JSON (json.loads ran first): strings with escapes,
    objects and arrays; scalars are skipped. Array items are located at their first character.
    """
    lines: dict[KeyPath, int] = {}
    line = 1
    i = 0
    n = len(text)
    # stack entries: [path, is_object, next_index, pending_key]
    stack: list[list] = []
    expecting_key = False

    def read_string(start: int) -> tuple[str, int]:
        nonlocal line
        j = start + 1
        out: list[str] = []
        while j < n:
            ch = text[j]
            if ch == "\\":
                out.append(text[j : j + 2])
                j += 2
                continue
            if ch == '"':
                break
            if ch == "\n":
                line += 1
            out.append(ch)
            j += 1
        raw = "".join(out)
        try:
            value = json.loads('"' + raw + '"')
        except ValueError:
            value = raw
        return value, j + 1

    def value_starts() -> None:
        # record the line of an array item as it begins
        if stack and not stack[-1][1]:
            top = stack[-1]
            lines.setdefault((*top[0], top[2]), line)

    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
            continue
        if ch in _WS or ch in ":,":
            if ch == "," and stack:
                top = stack[-1]
                if top[1]:
                    expecting_key = True
                else:
                    top[2] += 1
            i += 1
            continue
        if ch == '"':
            if stack and stack[-1][1] and expecting_key:
                key, i = read_string(i)
                stack[-1][3] = key
                lines[(*stack[-1][0], key)] = line
                expecting_key = False
                continue
            value_starts()
            _, i = read_string(i)
            continue
        if ch in "{[":
            value_starts()
            if stack:
                top = stack[-1]
                path: KeyPath = (*top[0], top[3]) if top[1] else (*top[0], top[2])
            else:
                path = ()
            stack.append([path, ch == "{", 0, None])
            expecting_key = ch == "{"
            i += 1
            continue
        if ch in "}]":
            stack.pop()
            expecting_key = False
            i += 1
            continue
        value_starts()
        while i < n and text[i] not in _WS + ",]}":
            i += 1
    return lines
