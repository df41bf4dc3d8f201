"""JUnit XML for CI systems: one test case per gate."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploytool.artifacts import write_text


def junit_xml(suite: str, gates: Sequence[dict[str, Any]], seconds: float = 0.0) -> str:
    failures = [g for g in gates if not g["passed"] and g.get("binding", True)]
    root = ET.Element("testsuites", name="deploytool", tests=str(len(gates)), failures=str(len(failures)))
    node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(gates)), failures=str(len(failures)),
                         errors="0", time=f"{seconds:.3f}")
    for gate in gates:
        case = ET.SubElement(node, "testcase", classname=f"{suite}.{gate['model']}", name=gate["name"], time="0")
        detail = f"value {gate['value']} vs threshold {gate['threshold']}"
        if gate["passed"]:
            ET.SubElement(case, "system-out").text = detail
        elif not gate.get("binding", True):  # measured, but the verdict does not rest on it
            ET.SubElement(case, "skipped", message=f"{gate['name']} failed on {gate['model']}, not binding: {detail}")
        else:
            failure = ET.SubElement(case, "failure", message=f"{gate['name']} failed on {gate['model']}: {detail}", type="GateFailure")
            failure.text = detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path, suite: str, gates: Sequence[dict[str, Any]], seconds: float = 0.0) -> None:
    write_text(path, junit_xml(suite, gates, seconds))
