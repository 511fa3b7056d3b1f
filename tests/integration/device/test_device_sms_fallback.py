"""Link down: the alert goes by SMS (real driver, fake modem on a pty); link back: by MQTT too."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ansimi_testkit import eventually
from device_testkit import Keys, gateway_site, make_agent, running

from ansimi.broker import Mosquitto, MosquittoConfig, free_port
from device.hal.fakes import FakeInputs, PtyModem
from device.hal.modem import SerialModem

NUMBER = "+820000000009"


async def test_sms_while_the_link_is_down_and_mqtt_once_it_is_back(tmp_path: Path) -> None:
    keys = Keys.new()
    broker = Mosquitto(MosquittoConfig(state_dir=tmp_path / "broker", port=free_port()))
    async with PtyModem() as pty:
        agent = make_agent(
            tmp_path,
            broker,  # configured, not started: the link is down
            keys,
            modem=SerialModem(pty.port, timeout_s=5),
            sms={"after_s": 0.3, "numbers": [NUMBER]},
        )
        inputs = agent.hardware.inputs
        assert isinstance(inputs, FakeInputs)
        async with running(agent.run()):
            await asyncio.sleep(0)
            inputs.press("emergency")
            inputs.release("emergency")
            (entry,) = agent.outbox.pending()
            # in Korean by default: UCS-2 in PDU mode, here one SMS in two concatenated parts
            await eventually(lambda: len(pty.received) == 2)
            assert {r.number for r in pty.received} == {NUMBER}
            assert [r.part[1:] for r in pty.received if r.part] == [(2, 1), (2, 2)]
            assert entry.id in pty.received[0].text and "비상벨" in pty.received[0].text
            assert agent.outbox.depth() == 1  # still to go by MQTT

            broker.start()
            try:
                async with gateway_site(tmp_path, broker, keys) as (_gateway, receiver):
                    await eventually(lambda: receiver.events.ids() == [entry.id])
                    await eventually(lambda: agent.outbox.depth() == 0)
            finally:
                broker.stop()
        assert len(pty.received) == 2  # once per alert
