"""A Nacos client that no one here wrote (nacos-sdk-python, the 2.x/3.x
SDK over gRPC) against shop-mesh's registry, driven by the integration
test `nacos::clients::nacos_sdk_python_registers_discovers_and_is_pushed_changes`.

Usage: python_client.py REGISTRY_PORT NACOS_GRPC_PORT SCRATCH_DIR

The SDK keeps a disk cache of what it discovered, and logs: both go under
SCRATCH_DIR, and the cache is not read at start, so one run never sees
another's services.

It registers `python-svc` at 127.0.0.1:7001, subscribes to
`server-product`, and says on stdout, a line each:
  REGISTERED                 its instance is registered
  SUBSCRIBED <ports>         the subscription's first answer
  PUSHED <ports>             the healthy ports of each push its
                             callback receives
It exits after it has been pushed a list whose healthy instances hold
the port named by the test on stdin ("EXPECT <port>"), then one whose
healthy instances do not ("GONE <port>").
"""

import asyncio
import sys

from v2.nacos import (
    ClientConfigBuilder,
    GRPCConfig,
    ListInstanceParam,
    NacosNamingService,
    RegisterInstanceParam,
    SubscribeServiceParam,
)


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
    naming = await NacosNamingService.create_naming_service(config)
    await naming.register_instance(
        RegisterInstanceParam(
            service_name="python-svc",
            group_name="DEFAULT_GROUP",
            ip="127.0.0.1",
            port=7001,
            weight=3.0,
            metadata={"lang": "python"},
            ephemeral=True,
        )
    )
    say("REGISTERED")

    pushes = asyncio.Queue()

    async def changed(instances):
        await pushes.put(sorted(i.port for i in instances if i.healthy))

    await naming.subscribe(
        SubscribeServiceParam(
            service_name="server-product",
            group_name="DEFAULT_GROUP",
            subscribe_callback=changed,
        )
    )
    listed = await naming.list_instances(
        ListInstanceParam(service_name="server-product", healthy_only=None)
    )
    say("SUBSCRIBED " + ",".join(str(i.port) for i in listed))

    loop = asyncio.get_running_loop()
    for _ in range(2):
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        want, port = line[0], int(line[1])
        while True:
            ports = await asyncio.wait_for(pushes.get(), timeout=30)
            say("PUSHED " + ",".join(str(p) for p in ports))
            if (port in ports) == (want == "EXPECT"):
                break
    await naming.shutdown()


asyncio.run(main())
