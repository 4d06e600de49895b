"""Sparkplug B for the anomaly recipe against a real mosquitto: a host subscribed to spBv1.0/#
decodes every payload with pysparkplug's protobuf; the Last Will is tested by killing the node."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

spb = pytest.importorskip("pysparkplug")

from edgellm.errors import RecipeError  # noqa: E402
from edgellm.integrations.sparkplug import DEVICE_METRICS, REBIRTH, SparkplugNode  # noqa: E402
from edgellm.recipes.config import SparkplugConfig, load_sparkplug  # noqa: E402
from mqtt_helpers import Probe, connection  # noqa: E402

NODE = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from edgellm.integrations.sparkplug import SparkplugNode
    from edgellm.recipes.config import SparkplugConfig
    from edgellm.service.connection import BrokerAddress, Connection
    conn = Connection(broker=BrokerAddress.parse(sys.argv[1]))
    node = SparkplugNode(conn, SparkplugConfig("plant", None, Path(sys.argv[2])), "edge1", "factory/+/+/explanation",
                         "SmolLM2").start()
    node.born.wait(10)
    print("born", flush=True)
    threading.Event().wait()
""")


def metrics(payload) -> dict:
    return {m.name: m.value for m in payload.metrics}


def explanation(machine: str) -> dict:
    return {"id": "ev-1", "machine": machine, "sensor": "vibration", "incomplete": False,
            "explanation": {"summary": "Vibration tripled.", "severity": "high"}}


def start_node(broker, state: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", NODE, broker.url, str(state)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    assert proc.stdout.readline().strip() == "born"
    return proc


def test_births_data_and_the_last_will_decode_and_bdseq_survives_a_restart(broker, tmp_path):
    host = Probe(connection(broker.url), "host", topics=("spBv1.0/#",))
    state = tmp_path / "bdseq"
    try:
        first = start_node(broker, state)
        try:
            birth = host.wait(lambda m: m.topic == "spBv1.0/plant/NBIRTH/edge1")
            nbirth = spb.NBirth.decode(birth.payload)
            assert nbirth.seq == 0 and metrics(nbirth) == {"bdSeq": 0, REBIRTH: False, "Properties/Model": "SmolLM2"}
            host.publish("factory/press-3/vibration/explanation", explanation("press-3"))
            dbirth = spb.DBirth.decode(host.wait(lambda m: m.topic == "spBv1.0/plant/DBIRTH/edge1/press-3").payload)
            assert set(metrics(dbirth)) == set(DEVICE_METRICS)
            ddata = spb.DData.decode(host.wait(lambda m: m.topic == "spBv1.0/plant/DDATA/edge1/press-3").payload)
            values = metrics(ddata)
            assert (dbirth.seq, ddata.seq) == (1, 2)
            assert all(m.datatype == spb.DataType.STRING for m in dbirth.metrics)
            assert values["Explanation/Summary"] == "Vibration tripled." and values["Explanation/Severity"] == "high"
            assert json.loads(values["Explanation/JSON"])["machine"] == "press-3"
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        death = spb.NDeath.decode(host.wait(lambda m: m.topic == "spBv1.0/plant/NDEATH/edge1", 30).payload)
        assert death.bd_seq_metric.value == 0  # the Will of the session NBIRTH bdSeq 0 began
        second = start_node(broker, state)
        try:
            again = spb.NBirth.decode(host.wait(lambda m: m.topic == "spBv1.0/plant/NBIRTH/edge1").payload)
            assert metrics(again)["bdSeq"] == 1  # kept across the restart
        finally:
            second.send_signal(signal.SIGKILL)
            second.wait()
    finally:
        host.close()


def test_a_rebirth_command_sends_every_birth_again(broker, probe, tmp_path):
    node = SparkplugNode(connection(broker.url), SparkplugConfig("plant", "n1", tmp_path / "bd"), "edge1",
                         "factory/+/+/explanation", "SmolLM2").start()
    try:
        assert node.born.wait(10)
        probe.publish("factory/m1/temp/explanation", explanation("m1"))
        probe.wait(lambda m: m.topic == "spBv1.0/plant/DDATA/n1/m1")
        now = spb.get_current_timestamp()
        command = spb.NCmd(timestamp=now, metrics=(spb.Metric(now, REBIRTH, spb.DataType.BOOLEAN, value=True),))
        probe.publish("spBv1.0/plant/NCMD/n1", command.encode(include_dtypes=True))
        assert spb.NBirth.decode(probe.wait(lambda m: m.topic == "spBv1.0/plant/NBIRTH/n1").payload).seq == 0
        assert spb.DBirth.decode(probe.wait(lambda m: m.topic == "spBv1.0/plant/DBIRTH/n1/m1").payload).seq == 1
    finally:
        node.stop()
    death = spb.NDeath.decode(probe.wait(lambda m: m.topic == "spBv1.0/plant/NDEATH/n1").payload)
    assert death.bd_seq_metric.value == 0  # an orderly stop says it too, with the session's bdSeq


def test_the_sparkplug_table_is_checked_naming_the_key(tmp_path):
    path = tmp_path / "edgellm.toml"
    path.write_text('[sparkplug]\ngroup = "plant"\n')
    assert load_sparkplug(path) == SparkplugConfig("plant", None, (tmp_path / "sparkplug-bdseq").resolve())
    path.write_text('[sparkplug]\ngroup = "a/b"\n')
    with pytest.raises(RecipeError, match="sparkplug.group"):
        load_sparkplug(path)
    path.write_text('[sparkplug]\nnodes = "x"\n')
    with pytest.raises(RecipeError, match="unknown key sparkplug.nodes"):
        load_sparkplug(path)
    path.write_text('[anomaly]\n')
    assert load_sparkplug(path) is None
