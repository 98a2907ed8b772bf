'use strict';
// A Nacos client that no one here wrote (the `nacos` package from the npm
// registry, Nacos's 1.x HTTP API) against shop-mesh's registry, driven by
// the integration test `nacos::clients::the_npm_nacos_client_registers_beats_lists_and_deregisters`.
//
// Usage: node node_client.js REGISTRY_PORT
//
// It registers `node-svc` at 127.0.0.1:7101 (beating every second once
// the registry has told it so), and says on stdout, a line each:
//   REGISTERED                its instance is registered
//   LISTED <ports>            server-product's healthy ports, when the test
//                             writes "LIST" on stdin
//   DEREGISTERED <count>      after "DEREGISTER": its instance is
//                             deregistered, and node-svc's instances the
//                             registry then lists
// and exits after the last.

const readline = require('readline');
const { NacosNamingClient } = require('nacos');

const quiet = { info() {}, warn() {}, debug() {}, error: console.error };

async function main() {
  const port = Number(process.argv[2]);
  const client = new NacosNamingClient({
    logger: quiet,
    serverList: `127.0.0.1:${port}`,
    namespace: 'public',
  });
  await client.ready();
  const instance = {
    ip: '127.0.0.1',
    port: 7101,
    metadata: {
      lang: 'node',
      'preserved.heart.beat.interval': '1000',
      'preserved.heart.beat.timeout': '20000',
      'preserved.ip.delete.timeout': '40000',
    },
  };
  await client.registerInstance('node-svc', instance);
  console.log('REGISTERED');

  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line === 'LIST') {
      const hosts = await client.selectInstances('server-product', 'DEFAULT_GROUP', '', true, false);
      console.log(`LISTED ${hosts.map(h => h.port).sort().join(',')}`);
    } else if (line === 'DEREGISTER') {
      await client.deregisterInstance('node-svc', instance);
      // A beat already on its way when the beats stopped registers the
      // instance again on arrival (Nacos's servers do the same); once the
      // beat interval has passed, none is, and a second deregistration
      // leaves it gone.
      await new Promise(resolve => setTimeout(resolve, 1500));
      await client.deregisterInstance('node-svc', instance);
      const left = await client.getAllInstances('node-svc', 'DEFAULT_GROUP', '', false);
      console.log(`DEREGISTERED ${left.length}`);
      break;
    }
  }
  await client.close();
  process.exit(0);
}

main().catch(err => {
  console.error(err);
  process.exit(1);
});
