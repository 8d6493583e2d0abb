// Lists the processes in a container's PID namespace, read from the host's /proc (the distroless image has no
// ps and no shell). Usage: node deploy/test/procs.mjs HOST_PID_OF_CONTAINER_INIT
// Prints JSON: [{ pid (in the container), hostPid, ppid (host), state, comm }].
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';

const init = process.argv[2];
const ns = readlinkSync(`/proc/${init}/ns/pid`);
const procs = [];
for (const entry of readdirSync('/proc')) {
  if (!/^\d+$/.test(entry)) continue;
  try {
    if (readlinkSync(`/proc/${entry}/ns/pid`) !== ns) continue;
    const status = readFileSync(`/proc/${entry}/status`, 'utf8');
    const field = (name) => new RegExp(`^${name}:\\s*(.*)$`, 'm').exec(status)?.[1] ?? '';
    const nspids = field('NSpid').split(/\s+/);
    procs.push({
      pid: Number(nspids.at(-1)), hostPid: Number(entry), ppid: Number(field('PPid')),
      state: field('State').charAt(0), comm: field('Name'),
    });
  } catch {
    // gone while we looked
  }
}
console.log(JSON.stringify(procs.sort((a, b) => a.pid - b.pid)));
