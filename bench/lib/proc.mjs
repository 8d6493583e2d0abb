// /proc helpers: process trees, RSS, CPU ticks, MemAvailable, fd limit; and a
// registry of every process the benchmark starts, so that all of them (and
// their descendants) are stopped on exit, on error and on Ctrl-C. Linux only.
//
// Adapted from ../shared/bench/lib/proc.mjs (our project's benchmark harness):
// same /proc parsing; added snapshots of a fixed pid list (no /proc rescan on
// every sample), the process registry, process-group kills and fdLimit().
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { spawn } from "node:child_process";

const CLK_TCK = 100; // sysconf(_SC_CLK_TCK) is 100 on every Linux we run on

function readStat(pid) {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    // comm may contain spaces/parens: fields after the last ')'
    const rest = s.slice(s.lastIndexOf(")") + 2).split(" ");
    // rest[0] = state (field 3), rest[1] = ppid (4), rest[11..14] = utime stime cutime cstime (14..17)
    return {
      ppid: Number(rest[1]),
      ticks: Number(rest[11]) + Number(rest[12]) + Number(rest[13]) + Number(rest[14]),
      state: rest[0],
    };
  } catch {
    return null;
  }
}

/** pid plus all its descendants (one scan of /proc). */
export function treePids(rootPid) {
  if (!rootPid || !fs.existsSync(`/proc/${rootPid}`)) return [];
  const kids = new Map();
  for (const d of fs.readdirSync("/proc")) {
    if (d.charCodeAt(0) < 48 || d.charCodeAt(0) > 57) continue;
    const st = readStat(d);
    if (!st) continue;
    let list = kids.get(st.ppid);
    if (!list) kids.set(st.ppid, (list = []));
    list.push(Number(d));
  }
  const out = [];
  const stack = [Number(rootPid)];
  while (stack.length && out.length < 10_000) {
    const p = stack.pop();
    out.push(p);
    for (const c of kids.get(p) ?? []) stack.push(c);
  }
  return out;
}

export function rssKb(pid) {
  try {
    const m = /VmRSS:\s+(\d+)\s+kB/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/** {procs, rssKb, cpuS} summed over a fixed list of pids (zombies and gone pids skipped). */
export function snapshotPids(pids) {
  let procs = 0;
  let rss = 0;
  let ticks = 0;
  for (const p of pids) {
    const st = readStat(p);
    if (!st || st.state === "Z") continue;
    procs++;
    rss += rssKb(p);
    ticks += st.ticks;
  }
  return { procs, rssKb: rss, cpuS: ticks / CLK_TCK };
}

/** Snapshot of a root pid's whole current tree. */
export function treeSnapshot(rootPid) {
  return snapshotPids(treePids(rootPid));
}

export function memAvailableMb() {
  const m = /MemAvailable:\s+(\d+)\s+kB/.exec(fs.readFileSync("/proc/meminfo", "utf8"));
  return m ? Math.round(Number(m[1]) / 1024) : 0;
}

/** Soft RLIMIT_NOFILE of this process (the children inherit it). */
export function fdLimit() {
  try {
    const m = /Max open files\s+(\d+)/.exec(fs.readFileSync("/proc/self/limits", "utf8"));
    return m ? Number(m[1]) : 1024;
  } catch {
    return 1024;
  }
}

export function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------- the registry of processes we started ----------
// Every process is spawned detached, i.e. as the leader of its own process
// group, so a group kill reaches whatever it forked that stayed in the group.
// Children that lead their own groups (our proxy puts each stdio child in its
// own group) are reached through the /proc tree instead.
const started = new Map(); // pid -> {cp, name, pids:Set}

/** Spawn a process we own; stdout/stderr kept as a short tail for error messages. */
export function startProcess(name, cmd, args, opts = {}) {
  // opts.stdin "pipe" gives the caller stdin; opts.rawStdout leaves stdout to the caller.
  const cp = spawn(cmd, args, { detached: true, stdio: [opts.stdin ?? "ignore", "pipe", "pipe"], ...opts.spawn });
  const entry = { cp, name, pids: new Set([cp.pid]), tail: "" };
  const keep = (c) => {
    entry.tail = (entry.tail + c).slice(-4000);
  };
  if (!opts.rawStdout) cp.stdout?.setEncoding("utf8").on("data", keep);
  cp.stderr?.setEncoding("utf8").on("data", keep);
  cp.stdin?.on("error", () => {}); // EPIPE when the child is gone: seen through 'exit' instead
  cp.on("error", (e) => keep(`\n[spawn error] ${e.message}`));
  if (cp.pid) started.set(cp.pid, entry);
  cp.on("exit", (code, sig) => {
    // The root is gone: never signal its pid (or group) again, it may be reused.
    // Descendants recorded earlier are still killed if alive (a child may outlive a crashed proxy).
    entry.exit = { code, sig };
    entry.pids.delete(cp.pid);
  });
  cp.tail = () => entry.tail;
  cp.rememberTree = () => {
    for (const p of treePids(cp.pid)) entry.pids.add(p);
  };
  return cp;
}

function killQuiet(pid, sig) {
  try {
    process.kill(pid, sig);
  } catch {}
}

/**
 * Stop a process we started and everything under it: SIGTERM to its group,
 * wait up to graceMs for the whole tree to go, then SIGKILL what is left
 * (each pid and each pid's group, since children may lead their own groups).
 */
export async function stopProcess(cp, graceMs = 5000) {
  const entry = started.get(cp.pid);
  if (!entry) return;
  if (!entry.exit) {
    for (const p of treePids(cp.pid)) entry.pids.add(p);
    killQuiet(-cp.pid, "SIGTERM");
  }
  const deadline = Date.now() + graceMs;
  while (Date.now() < deadline) {
    if (!entry.exit) for (const p of treePids(cp.pid)) entry.pids.add(p);
    if (![...entry.pids].some(alive)) break;
    await sleep(20);
  }
  for (const p of entry.pids) {
    if (!alive(p)) continue;
    killQuiet(-p, "SIGKILL");
    killQuiet(p, "SIGKILL");
  }
  if (!entry.exit) killQuiet(-cp.pid, "SIGKILL");
  started.delete(cp.pid);
}

/** Synchronous last resort (process 'exit', signals): SIGKILL everything we started. */
export function killAllSync() {
  for (const [pid, entry] of started) {
    if (!entry.exit) for (const p of treePids(pid)) entry.pids.add(p);
    for (const p of entry.pids) {
      killQuiet(-p, "SIGKILL");
      killQuiet(p, "SIGKILL");
    }
    if (!entry.exit) killQuiet(-pid, "SIGKILL");
  }
  started.clear();
}

/** Stop everything still registered (async, graceful first). */
export async function stopAll() {
  await Promise.all([...started.values()].map((e) => stopProcess(e.cp, 3000)));
}

/**
 * A scratch directory removed at exit, and every registered process stopped on exit, on SIGINT/SIGTERM/SIGHUP
 * (exit 130) and by a watchdog after `maxMinutes` (exit 3): the whole run is bounded whatever happens.
 */
export function scratchDirWithCleanup(name, prefix, maxMinutes) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const removeDir = () => {
    try {
      fs.rmSync(dir, { recursive: true, force: true });
    } catch {}
  };
  const bail = (why, code) => {
    console.error(why);
    killAllSync();
    removeDir();
    process.exit(code);
  };
  process.on("exit", () => {
    killAllSync();
    removeDir();
  });
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) process.on(sig, () => bail(`\n${name}: ${sig}, stopping everything it started`, 130));
  setTimeout(() => bail(`${name}: watchdog: run exceeded MAX_MINUTES=${maxMinutes}, aborting`, 3), maxMinutes * 60_000).unref();
  return { dir, removeDir };
}
