"""nacos-sdk-python's config service (the 2.x/3.x SDK, over gRPC) against
shop-mesh's config centre, driven by the integration test
`nacos::clients::nacos_sdk_python_publishes_reads_and_listens_to_config`.

Usage: python_config_client.py REGISTRY_PORT NACOS_GRPC_PORT SCRATCH_DIR

Its cache and logs go under SCRATCH_DIR. It says on stdout, a line each:
  PUBLISHED                 it published py-app (properties, a=1)
  GOT <content>             what get_config read back
  STALE-CAS <refused|taken> what a publish with a stale cas_md5 came to
  MISSING <content>         what get_config reads of an item that is not there
  LISTENING                 its listener on py-app is added
  CHANGED <content>         each content its listener is called with
It exits once its listener has been called with the content the test
names on stdin ("EXPECT <content>").
"""

import asyncio
import sys

from v2.nacos import ClientConfigBuilder, ConfigParam, GRPCConfig, NacosConfigService


def say(line):
    print(line, flush=True)


async def main():
    registry_port, grpc_port, scratch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    config = (
        ClientConfigBuilder()
        .server_address(f"127.0.0.1:{registry_port}")
        .cache_dir(f"{scratch}/cache")
        .log_dir(f"{scratch}/logs")
        .load_cache_at_start(False)
        .grpc_config(GRPCConfig(grpc_timeout=5000, port_offset=grpc_port - registry_port))
        .build()
    )
    configs = await NacosConfigService.create_config_service(config)
    await configs.publish_config(
        ConfigParam(data_id="py-app", group="DEFAULT_GROUP", content="a=1", type="properties")
    )
    say("PUBLISHED")
    got = await configs.get_config(ConfigParam(data_id="py-app", group="DEFAULT_GROUP"))
    say(f"GOT {got}")
    try:
        await configs.publish_config(
            ConfigParam(
                data_id="py-app",
                group="DEFAULT_GROUP",
                content="a=stale",
                cas_md5="0" * 32,
            )
        )
        say("STALE-CAS taken")
    except Exception:
        say("STALE-CAS refused")
    missing = await configs.get_config(ConfigParam(data_id="py-nothing", group="DEFAULT_GROUP"))
    say(f"MISSING {missing}")

    changes = asyncio.Queue()

    async def listener(tenant, group, data_id, content):
        await changes.put(content)

    await configs.add_listener("py-app", "DEFAULT_GROUP", listener)
    say("LISTENING")
    expect = (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()
    expected = expect.removeprefix("EXPECT ")
    while True:
        content = await asyncio.wait_for(changes.get(), timeout=30)
        say(f"CHANGED {content}")
        if content == expected:
            break
    await configs.shutdown()


asyncio.run(main())
