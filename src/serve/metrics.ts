/**
 * `GET /metrics` of `appshot serve`, in Prometheus text format, through
 * prom-client (the de-facto Node client, maintained by the Prometheus
 * community's siblings at siimon/prom-client; it gets the exposition
 * format, escaping and histogram buckets right, which we would otherwise
 * re-derive). A registry of its own, not the global one: two servers in
 * one process (tests, later the engine) do not mix their figures.
 */
import { createServer, type Server } from 'node:http';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { InstanceStateName } from './spec.js';

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export class ServeMetrics {
  readonly registry = new Registry();
  readonly restoreSeconds = new Histogram({
    name: 'appshot_serve_restore_seconds',
    help: 'Time to restore a service instance from its image',
    labelNames: ['service'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly cloneSeconds = new Histogram({
    name: 'appshot_serve_clone_seconds',
    help: 'Time to clone a service instance from its template',
    labelNames: ['service'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly snapshotSeconds = new Histogram({
    name: 'appshot_serve_snapshot_seconds',
    help: 'Time to snapshot (suspend) an idle instance',
    labelNames: ['service'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly heldSeconds = new Histogram({
    name: 'appshot_serve_held_seconds',
    help: 'Time a connection waited at the front door before it was forwarded',
    labelNames: ['service'],
    buckets: [0.0001, 0.0005, ...LATENCY_BUCKETS],
    registers: [this.registry],
  });
  readonly waits = new Counter({
    name: 'appshot_serve_long_waits_total',
    help: 'Connections found waiting --max-wait at the front door, by decision (start: one more instance; report: none could be started)',
    labelNames: ['service', 'decision'],
    registers: [this.registry],
  });
  readonly held = new Gauge({
    name: 'appshot_serve_connections_held',
    help: 'Connections waiting for an instance: held by the front door or in its listen backlog',
    labelNames: ['service'],
    registers: [this.registry],
  });
  readonly active = new Gauge({
    name: 'appshot_serve_connections_active',
    help: 'Connections forwarded and open',
    labelNames: ['service'],
    registers: [this.registry],
  });
  readonly connections = new Counter({
    name: 'appshot_serve_connections_total',
    help: 'Connections accepted by the front door, by outcome',
    labelNames: ['service', 'outcome'],
    registers: [this.registry],
  });
  readonly forwardedBytes = new Counter({
    name: 'appshot_serve_forwarded_bytes_total',
    help: 'Bytes the front door forwarded, counted when each connection closes',
    labelNames: ['service', 'direction'],
    registers: [this.registry],
  });
  readonly instances = new Gauge({
    name: 'appshot_serve_instances',
    help: 'Instances by state',
    labelNames: ['service', 'state'],
    registers: [this.registry],
  });
  readonly cpu = new Gauge({
    name: 'appshot_serve_instance_cpu_cores',
    help: 'Cores an instance used over the last second (services with a CPU target)',
    labelNames: ['service', 'instance'],
    registers: [this.registry],
  });
  readonly snapshots = new Counter({
    name: 'appshot_serve_snapshots_total',
    help: 'Snapshots taken of idle instances, by result',
    labelNames: ['service', 'result'],
    registers: [this.registry],
  });
  readonly crashes = new Counter({
    name: 'appshot_serve_crashes_total',
    help: 'Instances found dead that the front door did not end',
    labelNames: ['service'],
    registers: [this.registry],
  });

  setInstances(service: string, counts: Partial<Record<InstanceStateName, number>>): void {
    for (const state of ['starting', 'running', 'suspending', 'suspended', 'stopping', 'crashed'] as const)
      this.instances.set({ service, state }, counts[state] ?? 0);
  }

  /** An HTTP listener answering GET /metrics. */
  listen(host: string, port: number): Promise<Server> {
    const server = createServer((req, res) => {
      if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: GET /metrics\n');
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(text),
        (e: Error) => res.writeHead(500).end(String(e.message)),
      );
    });
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve(server);
      });
    });
  }
}
