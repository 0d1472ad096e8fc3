// The addon's face for the drivers: ptrace (trace.c), page data (pages.c),
// and the small readers of kernel state that need a system call Node does
// not offer (pidfd_getfd, tee, SysV). Synchronous, on the JS thread:
// ptrace belongs to the thread that attached.
#include <napi.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include <dirent.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>

#include "addon.h"

extern "C" {
#include "pages.h"
#include "sockdiag.h"
#include "trace.h"
}

namespace {

using appshot::ThrowErrno;

pid_t Tid(const Napi::CallbackInfo& info, size_t i = 0) {
  return info[i].As<Napi::Number>().Int32Value();
}

uint64_t U64(const Napi::Value& v) {
  bool lossless;
  if (v.IsBigInt()) return v.As<Napi::BigInt>().Uint64Value(&lossless);
  return static_cast<uint64_t>(v.As<Napi::Number>().Int64Value());
}

// Returns true if rc is an error, after throwing it.
bool Failed(const Napi::Env& env, int rc, const std::string& what) {
  if (rc >= 0) return false;
  ThrowErrno(env, what, -rc);
  return true;
}

// seize(tid, exitKill = false)
Napi::Value Seize(const Napi::CallbackInfo& info) {
  bool exit_kill = info.Length() > 1 && info[1].ToBoolean().Value();
  Failed(info.Env(), trace_seize(Tid(info), exit_kill), "ptrace seize " + std::to_string(Tid(info)));
  return info.Env().Undefined();
}

Napi::Value KeepOnExit(const Napi::CallbackInfo& info) {
  Failed(info.Env(), trace_keep_on_exit(Tid(info)), "ptrace setoptions " + std::to_string(Tid(info)));
  return info.Env().Undefined();
}

// keepOnExitAll(tids[]): keepOnExit of each, in one call (a restore's
// commit clears PTRACE_O_EXITKILL on every thread it made, with a client
// waiting on serve's prepared resume). Throws at the first that fails,
// naming it; those before it are done.
Napi::Value KeepOnExitAll(const Napi::CallbackInfo& info) {
  auto a = info[0].As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); i++) {
    pid_t tid = a.Get(i).As<Napi::Number>().Int32Value();
    if (Failed(info.Env(), trace_keep_on_exit(tid), "ptrace setoptions " + std::to_string(tid))) break;
  }
  return info.Env().Undefined();
}

// detachAll(tids[]) -> how many were let go (PTRACE_DETACH, no signal),
// in order, before the first that failed (tids.length if none did): the
// caller handles that one (ESRCH: killed meanwhile) and goes on after it.
// One call for all of a restore's threads, the first let go running while
// the others are.
Napi::Value DetachAll(const Napi::CallbackInfo& info) {
  auto a = info[0].As<Napi::Array>();
  uint32_t i = 0;
  for (; i < a.Length(); i++)
    if (trace_detach(a.Get(i).As<Napi::Number>().Int32Value(), 0) < 0) break;
  return Napi::Number::New(info.Env(), i);
}

Napi::Value KillOnExit(const Napi::CallbackInfo& info) {
  Failed(info.Env(), trace_kill_on_exit(Tid(info)), "ptrace setoptions " + std::to_string(Tid(info)));
  return info.Env().Undefined();
}

Napi::Value Interrupt(const Napi::CallbackInfo& info) {
  Failed(info.Env(), trace_interrupt(Tid(info)), "ptrace interrupt");
  return info.Env().Undefined();
}

Napi::Value Cont(const Napi::CallbackInfo& info) {
  Failed(info.Env(), trace_cont(Tid(info), info[1].As<Napi::Number>().Int32Value()), "ptrace cont");
  return info.Env().Undefined();
}

Napi::Value Detach(const Napi::CallbackInfo& info) {
  Failed(info.Env(), trace_detach(Tid(info), info[1].As<Napi::Number>().Int32Value()),
         "ptrace detach");
  return info.Env().Undefined();
}

Napi::Value Report(Napi::Env env, const trace_report& r);

// waitAny(tids[], timeoutMs) -> the next report of one of `tids`, or null.
Napi::Value WaitAny(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto a = info[0].As<Napi::Array>();
  std::vector<pid_t> tids(a.Length());
  for (uint32_t i = 0; i < a.Length(); i++) tids[i] = a.Get(i).As<Napi::Number>().Int32Value();
  trace_report r;
  int rc = trace_wait_any(tids.data(), tids.size(), info[1].As<Napi::Number>().Int32Value(), &r);
  if (Failed(env, rc, "waiting for tracees")) return env.Undefined();
  return Report(env, r);
}

// wait(tid, timeoutMs) -> null | { kind, tid, sig, event, msg, status }
Napi::Value Wait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  trace_report r;
  int rc = trace_wait(Tid(info), info[1].As<Napi::Number>().Int32Value(), &r);
  if (rc == -ECHILD) return env.Null();
  if (Failed(env, rc, "waiting for tracees")) return env.Undefined();
  return Report(env, r);
}

Napi::Value Report(Napi::Env env, const trace_report& r) {
  if (r.kind == TRACE_NONE) return env.Null();
  static const char* names[] = {"none", "stop", "group-stop", "signal", "event", "syscall", "exited"};
  Napi::Object o = Napi::Object::New(env);
  o.Set("kind", names[r.kind]);
  o.Set("tid", r.tid);
  o.Set("sig", r.sig);
  o.Set("event", r.event);
  o.Set("msg", Napi::Number::New(env, static_cast<double>(r.msg)));
  o.Set("status", r.status);
  return o;
}

Napi::Value GetRegs(const Napi::CallbackInfo& info) {
  struct user_regs_struct regs;
  if (Failed(info.Env(), trace_get_regs(Tid(info), &regs), "reading registers"))
    return info.Env().Undefined();
  return Napi::Buffer<uint8_t>::Copy(info.Env(), reinterpret_cast<uint8_t*>(&regs), sizeof regs);
}

Napi::Value SetRegs(const Napi::CallbackInfo& info) {
  auto b = info[1].As<Napi::Buffer<uint8_t>>();
  struct user_regs_struct regs;
  if (b.Length() != sizeof regs) {
    Napi::TypeError::New(info.Env(), "registers: wrong size").ThrowAsJavaScriptException();
    return info.Env().Undefined();
  }
  std::memcpy(&regs, b.Data(), sizeof regs);
  Failed(info.Env(), trace_set_regs(Tid(info), &regs), "writing registers");
  return info.Env().Undefined();
}

// rewind(regs: Buffer) -> Buffer | null: the registers that restart an
// interrupted system call, or null if the thread was not in one.
Napi::Value Rewind(const Napi::CallbackInfo& info) {
  auto b = info[0].As<Napi::Buffer<uint8_t>>();
  struct user_regs_struct regs;
  if (b.Length() != sizeof regs) return info.Env().Null();
  std::memcpy(&regs, b.Data(), sizeof regs);
  if (!trace_rewind(&regs)) return info.Env().Null();
  return Napi::Buffer<uint8_t>::Copy(info.Env(), reinterpret_cast<uint8_t*>(&regs), sizeof regs);
}

Napi::Value GetXstate(const Napi::CallbackInfo& info) {
  std::vector<uint8_t> buf(1 << 14);
  int n = trace_get_xstate(Tid(info), buf.data(), buf.size());
  if (Failed(info.Env(), n, "reading FPU state")) return info.Env().Undefined();
  return Napi::Buffer<uint8_t>::Copy(info.Env(), buf.data(), n);
}

Napi::Value SetXstate(const Napi::CallbackInfo& info) {
  auto b = info[1].As<Napi::Buffer<uint8_t>>();
  Failed(info.Env(), trace_set_xstate(Tid(info), b.Data(), b.Length()), "writing FPU state");
  return info.Env().Undefined();
}

Napi::Value GetSigmask(const Napi::CallbackInfo& info) {
  uint64_t mask = 0;
  if (Failed(info.Env(), trace_get_sigmask(Tid(info), &mask), "reading signal mask"))
    return info.Env().Undefined();
  return Napi::BigInt::New(info.Env(), mask);
}

Napi::Value SetSigmask(const Napi::CallbackInfo& info) {
  Failed(info.Env(), trace_set_sigmask(Tid(info), U64(info[1])), "writing signal mask");
  return info.Env().Undefined();
}

Napi::Value GetSiginfo(const Napi::CallbackInfo& info) {
  uint8_t si[128];
  if (Failed(info.Env(), trace_get_siginfo(Tid(info), si), "reading siginfo"))
    return info.Env().Undefined();
  return Napi::Buffer<uint8_t>::Copy(info.Env(), si, sizeof si);
}

// peekSiginfo(tid, shared) -> Buffer of 128-byte siginfos, in queue order.
Napi::Value PeekSiginfo(const Napi::CallbackInfo& info) {
  // Real-time signals queue up to RLIMIT_SIGPENDING: read them all, a
  // batch at a time.
  const int batch = 256;
  std::vector<uint8_t> all;
  for (uint64_t from = 0;; from += batch) {
    std::vector<uint8_t> buf(128 * batch);
    int n = trace_peek_siginfo(Tid(info), info[1].As<Napi::Boolean>(), from, buf.data(), batch);
    if (Failed(info.Env(), n, "reading pending signals")) return info.Env().Undefined();
    all.insert(all.end(), buf.begin(), buf.begin() + static_cast<size_t>(n) * 128);
    if (n < batch) break;
  }
  return Napi::Buffer<uint8_t>::Copy(info.Env(), all.data(), all.size());
}

Napi::Value GetRseq(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  trace_rseq r;
  if (Failed(env, trace_get_rseq(Tid(info), &r), "reading rseq")) return env.Undefined();
  Napi::Object o = Napi::Object::New(env);
  o.Set("pointer", Napi::BigInt::New(env, r.rseq_abi_pointer));
  o.Set("size", r.rseq_abi_size);
  o.Set("signature", r.signature);
  o.Set("flags", r.flags);
  return o;
}

// syscallDispatchMode(tid) -> the mode of the stopped thread's syscall
// user dispatch (PR_SET_SYSCALL_USER_DISPATCH; 0: off), read by its tracer
// (PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG, Linux 5.19); -errno if the
// kernel cannot say.
Napi::Value SyscallDispatchMode(const Napi::CallbackInfo& info) {
  const int GET_SUD_CONFIG = 0x4211; // PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG (0x4210 sets it)
  struct {
    uint64_t mode, selector, offset, len;
  } config = {};
  if (ptrace(static_cast<enum __ptrace_request>(GET_SUD_CONFIG), Tid(info), sizeof config, &config) != 0)
    return Napi::Number::New(info.Env(), -errno);
  return Napi::Number::New(info.Env(), static_cast<double>(config.mode));
}

Napi::Value GetRobustList(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t head, len;
  if (Failed(env, trace_get_robust_list(Tid(info), &head, &len), "reading robust list"))
    return env.Undefined();
  Napi::Object o = Napi::Object::New(env);
  o.Set("head", Napi::BigInt::New(env, head));
  o.Set("length", Napi::Number::New(env, static_cast<double>(len)));
  return o;
}

// inject(tid, syscallInsn: bigint, nr, args: bigint[], seed?: boolean) -> bigint (the raw
// return value; -4095..-1 is -errno).
Napi::Value Inject(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  long args[6] = {0, 0, 0, 0, 0, 0};
  auto a = info[3].As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length() && i < 6; i++) args[i] = static_cast<long>(U64(a.Get(i)));
  long ret = 0;
  bool seed = info.Length() > 4 && info[4].ToBoolean();
  auto inject = seed ? trace_inject_seed : trace_inject;
  int rc = inject(Tid(info), U64(info[1]), info[2].As<Napi::Number>().Int64Value(), args, &ret);
  if (Failed(env, rc, "running a system call in thread " + std::to_string(Tid(info))))
    return env.Undefined();
  return Napi::BigInt::New(env, static_cast<int64_t>(ret));
}

// forkStopped(tid, syscallInsn: bigint, flags: bigint) -> { ret: bigint, child }: clone(flags)
// run in the stopped thread `tid`; the child traced, stopped at its birth and set to die
// with us (trace_fork_stopped); child 0 if there is none (ret says why).
Napi::Value ForkStopped(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  long ret = 0;
  pid_t child = 0;
  int rc = trace_fork_stopped(Tid(info), U64(info[1]), static_cast<unsigned long>(U64(info[2])), &ret, &child);
  if (Failed(env, rc, "forking thread " + std::to_string(Tid(info)))) return env.Undefined();
  Napi::Object o = Napi::Object::New(env);
  o.Set("ret", Napi::BigInt::New(env, static_cast<int64_t>(ret)));
  o.Set("child", child);
  return o;
}

// endChild(pid): kills a child of forkStopped and waits for its death.
Napi::Value EndChild(const Napi::CallbackInfo& info) {
  Failed(info.Env(), trace_end_child(Tid(info)), "ending copy " + std::to_string(Tid(info)));
  return info.Env().Undefined();
}

// batchCode() -> { code: Buffer, stoppedAt }: the code that runs a batch of
// system calls inside a thread (trace.c), to copy into the process.
Napi::Value BatchCode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t size, stopped_at;
  const unsigned char* code = trace_batch_code(&size, &stopped_at);
  Napi::Object out = Napi::Object::New(env);
  out.Set("code", Napi::Buffer<uint8_t>::Copy(env, code, size));
  out.Set("stoppedAt", Napi::Number::New(env, static_cast<double>(stopped_at)));
  out.Set("frameRoom", Napi::Number::New(env, TRACE_BATCH_FRAME_ROOM));
  return out;
}

// The end of a batch (trace_batch_end) as JavaScript keeps it between
// batches: its signal, and 0x100 if the thread may use the frame; 0: not
// chosen yet.
static trace_batch_end EndOf(const Napi::Value& v) {
  uint32_t word = v.IsNumber() ? v.As<Napi::Number>().Uint32Value() : 0;
  return trace_batch_end{static_cast<int>(word & 0xff), (word & 0x100) ? 1 : 0};
}

static uint32_t EndWord(const trace_batch_end& end) {
  return static_cast<uint32_t>(end.sig & 0xff) | (end.frame_ok ? 0x100u : 0u);
}

// injectBatch(tid, codeAddress, tableAddress, clones = false, frame = 0n, end = 0)
// -> end: runs the batch in one stop; clones: its clone calls make threads
// traced without a clone event each (trace_inject_batch_clones); frame: the
// address of batchFrameRoom bytes for the frame that takes the thread back
// on its own if appshot dies meanwhile (trace_inject_batch_framed); end: the
// thread's end signal as an earlier batch returned it (EndOf), kept unless
// it is pending now. Returns the end this batch used (0 if none was chosen).
Napi::Value InjectBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool clones = info.Length() > 3 && info[3].ToBoolean().Value();
  uint64_t frame = info.Length() > 4 && info[4].IsBigInt() ? U64(info[4]) : 0;
  trace_batch_end end = EndOf(info[5]);
  int rc = clones ? trace_inject_batch_clones(Tid(info), U64(info[1]), U64(info[2]), &end)
                  : trace_inject_batch_framed(Tid(info), U64(info[1]), U64(info[2]), frame, &end);
  if (Failed(env, rc, "running a batch of system calls in thread " + std::to_string(Tid(info)))) return env.Undefined();
  return Napi::Number::New(env, EndWord(end));
}

// injectBatches(code, jobs: [tid, tableAddress][], end = 0) -> number[]: each thread's
// batch run at once (trace_inject_batches), all from the code at `code`; for each job, 0
// or the -errno its batch failed with. Never throws for a job: every thread is put back
// first, and the caller says which failed. end: as injectBatch returned it for a thread
// of the process.
Napi::Value InjectBatches(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t code = U64(info[0]);
  auto list = info[1].As<Napi::Array>();
  std::vector<trace_batch_job> jobs(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) {
    auto job = list.Get(i).As<Napi::Array>();
    jobs[i] = trace_batch_job{static_cast<pid_t>(job.Get(0u).As<Napi::Number>().Int32Value()), code, U64(job.Get(1u)), 0};
  }
  trace_batch_end known = EndOf(info[2]);
  trace_inject_batches(jobs.data(), jobs.size(), &known);
  Napi::Array out = Napi::Array::New(env, jobs.size());
  for (uint32_t i = 0; i < jobs.size(); i++) out.Set(i, Napi::Number::New(env, jobs[i].rc));
  return out;
}

// seccompFilters(tid) -> [{ program: Buffer, flags: bigint }], oldest
// first (the order to install them in): each program as struct sock_filter
// instructions, 8 bytes each. PTRACE_SECCOMP_GET_FILTER's index 0 is the
// oldest filter (kernel/seccomp.c get_nth_filter counts from the end of the
// chain), so the indexes are already in installation order.
Napi::Value SeccompFilters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<Napi::Object> oldest_first;
  for (unsigned long index = 0;; index++) {
    long n = trace_seccomp_filter(Tid(info), index, nullptr, 0);
    if (n == -ENOENT) break;
    if (Failed(env, static_cast<int>(n), "reading seccomp filter " + std::to_string(index)))
      return env.Undefined();
    std::vector<uint8_t> program(static_cast<size_t>(n) * 8);
    n = trace_seccomp_filter(Tid(info), index, program.data(), static_cast<unsigned long>(n));
    if (Failed(env, static_cast<int>(n), "reading seccomp filter " + std::to_string(index)))
      return env.Undefined();
    uint64_t flags = 0;
    if (Failed(env, trace_seccomp_flags(Tid(info), index, &flags), "reading seccomp filter flags"))
      return env.Undefined();
    Napi::Object f = Napi::Object::New(env);
    f.Set("program", Napi::Buffer<uint8_t>::Copy(env, program.data(), static_cast<size_t>(n) * 8));
    f.Set("flags", Napi::BigInt::New(env, flags));
    oldest_first.push_back(f);
  }
  Napi::Array out = Napi::Array::New(env, oldest_first.size());
  for (size_t i = 0; i < oldest_first.size(); i++) out.Set(static_cast<uint32_t>(i), oldest_first[i]);
  return out;
}

// schedAttributes(tid) -> { policy, priority, affinity: Buffer, ioprio }:
// the scheduling attributes of any thread, asked from here (each call
// takes a TID), so that a snapshot need not run them inside the frozen
// thread. Throws with the errno of the first that fails.
Napi::Value SchedAttributes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t tid = Tid(info);
  long policy = syscall(SYS_sched_getscheduler, tid);
  if (policy < 0) {
    ThrowErrno(env, "sched_getscheduler", errno);
    return env.Undefined();
  }
  int priority = 0;
  if (syscall(SYS_sched_getparam, tid, &priority) < 0) {
    ThrowErrno(env, "sched_getparam", errno);
    return env.Undefined();
  }
  unsigned char mask[128];
  long bytes = syscall(SYS_sched_getaffinity, tid, sizeof mask, mask);
  if (bytes < 0) {
    ThrowErrno(env, "sched_getaffinity", errno);
    return env.Undefined();
  }
  long ioprio = syscall(SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, tid);
  if (ioprio < 0) {
    ThrowErrno(env, "ioprio_get", errno);
    return env.Undefined();
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("policy", Napi::Number::New(env, static_cast<double>(policy)));
  out.Set("priority", Napi::Number::New(env, priority));
  out.Set("affinity", Napi::Buffer<uint8_t>::Copy(env, mask, static_cast<size_t>(bytes)));
  out.Set("ioprio", Napi::Number::New(env, static_cast<double>(ioprio)));
  return out;
}

// setAffinity(tid, mask): sched_setaffinity of any thread, from here.
Napi::Value SetAffinity(const Napi::CallbackInfo& info) {
  auto mask = info[1].As<Napi::Buffer<uint8_t>>();
  if (syscall(SYS_sched_setaffinity, Tid(info), mask.Length(), mask.Data())) ThrowErrno(info.Env(), "sched_setaffinity", errno);
  return info.Env().Undefined();
}

// The guard's process: waits for a byte (the probe is over, its tracer
// put the mask back) or for the end of the pipe with none (its tracer
// died first), then puts `mask` back on thread `tid` if the thread still
// has a single CPU (one the probe gave it; a mask the application set
// itself since is left alone), and exits. Only async-signal-safe calls:
// the fork of a process with threads.
[[noreturn]] void GuardAffinity(pid_t tid, const uint8_t* mask, size_t length, int released) {
  setsid();
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGTSTP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2}) sigaction(sig, &ignore, nullptr);
  if (released > 0) syscall(SYS_close_range, 0, released - 1, 0);
  syscall(SYS_close_range, released + 1, ~0U, 0);
  char c;
  ssize_t n;
  while ((n = read(released, &c, 1)) < 0 && errno == EINTR) {
  }
  if (n == 1) _exit(0);
  uint8_t now[128];
  long bytes = syscall(SYS_sched_getaffinity, tid, sizeof now, now);
  int cpus = 0;
  for (long i = 0; i < bytes; i++) cpus += __builtin_popcount(now[i]);
  if (cpus == 1) syscall(SYS_sched_setaffinity, tid, length, mask);
  _exit(0);
}

// guardAffinity(tid, mask) -> { fd, pid }: a process of its own (a fork,
// in a session of its own, deaf to a terminal's signals) that puts `mask`
// back as thread `tid`'s CPU affinity if appshot dies (kill -9) before it
// says, with releaseGuard, that it did so itself: a probe that moves a
// frozen thread from CPU to CPU must not leave it on one. `fd` is the
// pipe appshot holds.
Napi::Value GuardAffinityNow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t tid = Tid(info);
  auto given = info[1].As<Napi::Buffer<uint8_t>>();
  uint8_t mask[128] = {};
  size_t length = std::min(given.Length(), sizeof mask);
  memcpy(mask, given.Data(), length);
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC)) {
    ThrowErrno(env, "pipe", errno);
    return env.Undefined();
  }
  pid_t pid = fork();
  if (pid == 0) GuardAffinity(tid, mask, length, pipefd[0]);
  int err = errno;
  close(pipefd[0]);
  if (pid < 0) {
    close(pipefd[1]);
    ThrowErrno(env, "fork (a guard of a thread's CPU affinity)", err);
    return env.Undefined();
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("fd", Napi::Number::New(env, pipefd[1]));
  out.Set("pid", Napi::Number::New(env, pid));
  return out;
}

// releaseGuard({fd, pid}): the guard told that the mask is back, and
// reaped.
Napi::Value ReleaseGuard(const Napi::CallbackInfo& info) {
  auto guard = info[0].As<Napi::Object>();
  int fd = guard.Get("fd").As<Napi::Number>().Int32Value();
  pid_t pid = guard.Get("pid").As<Napi::Number>().Int32Value();
  char done = 1;
  while (write(fd, &done, 1) < 0 && errno == EINTR) {
  }
  close(fd);
  while (waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
  }
  return info.Env().Undefined();
}

// securebits() -> this thread's PR_GET_SECUREBITS: what a restore's seeds
// start with (they inherit it), for the privilege rule.
Napi::Value Securebits(const Napi::CallbackInfo& info) {
  int bits = prctl(PR_GET_SECUREBITS);
  if (bits < 0) {
    ThrowErrno(info.Env(), "prctl(PR_GET_SECUREBITS)", errno);
    return info.Env().Undefined();
  }
  return Napi::Number::New(info.Env(), bits);
}

// suspendSeccomp(tid, exitKill = false): exitKill keeps PTRACE_O_EXITKILL,
// which a restore's tracees have until the commit (SETOPTIONS replaces
// every option).
Napi::Value SuspendSeccomp(const Napi::CallbackInfo& info) {
  bool exit_kill = info.Length() > 1 && info[1].ToBoolean().Value();
  Failed(info.Env(), trace_suspend_seccomp(Tid(info), exit_kill), "suspending seccomp for a traced thread");
  return info.Env().Undefined();
}

// readMemory(pid, addr: bigint, length) -> Buffer
Napi::Value ReadMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t len = info[2].As<Napi::Number>().Uint32Value();
  auto out = Napi::Buffer<uint8_t>::New(env, len);
  struct iovec local = {out.Data(), len}, remote = {reinterpret_cast<void*>(U64(info[1])), len};
  ssize_t n = process_vm_readv(Tid(info), &local, 1, &remote, 1, 0);
  if (n != static_cast<ssize_t>(len)) {
    ThrowErrno(env, "reading process memory", n < 0 ? errno : EIO);
    return env.Undefined();
  }
  return out;
}

// processCpuTimeNs(pid) -> bigint: the CPU time process `pid` has used,
// all its threads and those that exited, in nanoseconds (its
// CLOCK_PROCESS_CPUTIME_ID as another process reads it: the clock id
// encodes the PID). /proc gives it in clock ticks only.
Napi::Value ProcessCpuTimeNs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = Tid(info);
  clockid_t clk = static_cast<clockid_t>((static_cast<uint32_t>(~pid) << 3) | 2u); // CPUCLOCK_SCHED
  struct timespec ts;
  if (syscall(SYS_clock_gettime, clk, &ts) != 0) {
    ThrowErrno(env, "reading a process's CPU time", errno);
    return env.Undefined();
  }
  return Napi::BigInt::New(env, static_cast<int64_t>(static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec));
}

// writeMemory(pid, addr: bigint, data: Buffer)
Napi::Value WriteMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto b = info[2].As<Napi::Buffer<uint8_t>>();
  struct iovec local = {b.Data(), b.Length()},
               remote = {reinterpret_cast<void*>(U64(info[1])), b.Length()};
  ssize_t n = process_vm_writev(Tid(info), &local, 1, &remote, 1, 0);
  if (n != static_cast<ssize_t>(b.Length()))
    ThrowErrno(env, "writing process memory", n < 0 ? errno : EIO);
  return env.Undefined();
}

// unixSockets() -> [{ ino, peer, type, state, rqueue, wqueue, shutdown,
// vfsIno?, vfsDev? }]: every unix socket of this network namespace
// (sock_diag), for peers, backlogs and the files of named ones.
Napi::Value UnixSockets(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  sockdiag_unix* all = nullptr;
  long n = sockdiag_unix_all(&all);
  if (n < 0) {
    ThrowErrno(env, "sock_diag (unix)", static_cast<int>(-n));
    return env.Undefined();
  }
  Napi::Array out = Napi::Array::New(env, n);
  for (long i = 0; i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("ino", Napi::Number::New(env, all[i].ino));
    o.Set("peer", Napi::Number::New(env, all[i].peer));
    o.Set("type", all[i].type);
    o.Set("state", all[i].state);
    o.Set("rqueue", Napi::Number::New(env, all[i].rqueue));
    o.Set("wqueue", Napi::Number::New(env, all[i].wqueue));
    o.Set("shutdown", all[i].shutdown);
    if (all[i].vfs_ino) {
      o.Set("vfsIno", Napi::Number::New(env, all[i].vfs_ino));
      o.Set("vfsDev", Napi::Number::New(env, static_cast<double>(all[i].vfs_dev)));
    }
    out.Set(static_cast<uint32_t>(i), o);
  }
  free(all);
  return out;
}

// peekSocket(fd, max) -> Buffer: what is queued for reading, left queued.
// A peek starts at the socket's own peek offset (SO_PEEK_OFF, off: -1)
// and moves it: from there it would miss the bytes before it, and leave
// the application's offset moved. So the peek starts at 0, and the
// application's offset is put back after.
Napi::Value PeekSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  size_t max = info[1].As<Napi::Number>().Uint32Value();
  std::vector<uint8_t> buf(max ? max : 1);
  int saved = -1, zero = 0;
  socklen_t sl = sizeof saved;
  if (getsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &saved, &sl)) saved = -1;
  if (saved > 0 && setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof zero)) {
    ThrowErrno(env, "peeking at a socket (setting its peek offset to 0)", errno);
    return env.Undefined();
  }
  ssize_t n = recv(fd, buf.data(), max, MSG_PEEK | MSG_DONTWAIT);
  int peekErrno = errno;
  if (saved >= 0) setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &saved, sizeof saved);
  errno = peekErrno;
  if (n < 0) {
    if (errno == EAGAIN) n = 0;
    else {
      ThrowErrno(env, "peeking at a socket", errno);
      return env.Undefined();
    }
  }
  return Napi::Buffer<uint8_t>::Copy(env, buf.data(), n);
}

// oobPending(fd) -> whether a stream socket holds an out-of-band byte not
// yet read (MSG_OOB: TCP's urgent data, a unix stream socket's since Linux
// 5.15). A peek with MSG_OOB leaves it where it is; a peek without it
// skips it. EINVAL: none (or SO_OOBINLINE, which keeps it in the stream).
Napi::Value OobPending(const Napi::CallbackInfo& info) {
  char c;
  ssize_t n = recv(info[0].As<Napi::Number>().Int32Value(), &c, 1, MSG_OOB | MSG_PEEK | MSG_DONTWAIT);
  return Napi::Boolean::New(info.Env(), n == 1);
}

// sockInfo(fd) -> { family, type, listening, reuseaddr, reuseport, v6only }
Napi::Value SockInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  auto get = [&](int level, int name) {
    int v = 0;
    socklen_t len = sizeof v;
    if (getsockopt(fd, level, name, &v, &len)) return -1;
    return v;
  };
  Napi::Object o = Napi::Object::New(env);
  o.Set("family", get(SOL_SOCKET, SO_DOMAIN));
  o.Set("type", get(SOL_SOCKET, SO_TYPE));
  o.Set("listening", get(SOL_SOCKET, SO_ACCEPTCONN) == 1);
  o.Set("reuseaddr", get(SOL_SOCKET, SO_REUSEADDR) == 1);
  o.Set("reuseport", get(SOL_SOCKET, SO_REUSEPORT) == 1);
  o.Set("v6only", get(IPPROTO_IPV6, IPV6_V6ONLY) == 1);
  return o;
}

// ---- PageWriter

Napi::Uint32Array Pairs(const Napi::Env& env, const uint32_t* p, size_t n) {
  auto a = Napi::Uint32Array::New(env, n * 2);
  if (n) std::memcpy(a.Data(), p, n * 2 * sizeof *p);
  return a;
}

class PageWriter : public Napi::ObjectWrap<PageWriter> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "PageWriter",
                       {InstanceMethod("dump", &PageWriter::Dump),
                        InstanceMethod("dumpScanned", &PageWriter::DumpScanned),
                        InstanceMethod("append", &PageWriter::Append),
                        InstanceMethod("appendFd", &PageWriter::AppendFd),
                        InstanceMethod("finish", &PageWriter::Finish),
                        InstanceMethod("synced", &PageWriter::Synced),
                        InstanceMethod("link", &PageWriter::Link),
                        InstanceMethod("fd", &PageWriter::Fd),
                        InstanceMethod("written", &PageWriter::Written),
                        InstanceMethod("drain", &PageWriter::Drain),
                        InstanceMethod("startHashing", &PageWriter::StartHashing),
                        InstanceMethod("startFlushing", &PageWriter::StartFlushing),
                        InstanceMethod("reserve", &PageWriter::Reserve),
                        InstanceMethod("abort", &PageWriter::Abort),
                        InstanceMethod("close", &PageWriter::Abort)});
  }

  // new PageWriter(dir, parentFds: number[], queueLimit?, direct?): an
  // unnamed file in dir; with a queue limit, written by a thread, with
  // O_DIRECT if `direct` (see pw_open).
  // The parents' page files are given as the descriptors their loader
  // checked (and still holds), never by path: a path may name another file
  // by now, whose bytes would decide which pages count as unchanged.
  explicit PageWriter(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PageWriter>(info) {
    Napi::Env env = info.Env();
    std::string path = info[0].As<Napi::String>().Utf8Value();
    if (info.Length() > 1 && info[1].IsArray()) {
      auto parents = info[1].As<Napi::Array>();
      for (uint32_t i = 0; i < parents.Length(); i++) {
        Napi::Value v = parents.Get(i);
        if (!v.IsNumber()) {
          Napi::TypeError::New(env, "parent page data: a descriptor").ThrowAsJavaScriptException();
          return;
        }
        int fd = v.As<Napi::Number>().Int32Value();
        struct stat st;
        if (fstat(fd, &st)) {
          ThrowErrno(env, "parent page data (descriptor " + std::to_string(fd) + ")", errno);
          return;
        }
        void* m = st.st_size ? mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
        if (m == MAP_FAILED) {
          ThrowErrno(env, "mapping parent page data (descriptor " + std::to_string(fd) + ")", errno);
          return;
        }
        maps_.push_back(static_cast<const uint8_t*>(m));
        sizes_.push_back(st.st_size);
      }
    }
    uint64_t queue_limit = info.Length() > 2 && info[2].IsNumber()
                               ? static_cast<uint64_t>(info[2].As<Napi::Number>().Int64Value())
                               : 0;
    bool direct = info.Length() > 3 && info[3].ToBoolean();
    int rc = pw_open(&w_, path.c_str(), queue_limit, direct ? 1 : 0);
    if (rc) {
      ThrowErrno(env, "creating " + path, -rc);
      return;
    }
    open_ = true;
    w_.parents = maps_.data();
    w_.parent_sizes = sizes_.data();
    w_.nparents = maps_.size();
  }

  ~PageWriter() override {
    if (open_) pw_abort(&w_);
    Unmap();
  }

 private:
  void Unmap() {
    for (size_t i = 0; i < maps_.size(); i++)
      if (maps_[i]) munmap(const_cast<uint8_t*>(maps_[i]), sizes_[i]);
    maps_.clear();
    sizes_.clear();
  }

  bool Check(const Napi::Env& env) {
    if (!open_) Napi::Error::New(env, "page writer is closed").ThrowAsJavaScriptException();
    return open_;
  }

  // dump(pid, pagemapFd, start, end, mode, parent?, forkedFrom?)
  //   -> { offset, runs, same, shared, pages }
  Napi::Value Dump(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Check(env) || !w_.buf) return env.Undefined();
    pages_parent parent{};
    bool has_parent = info.Length() > 5 && info[5].IsObject();
    if (has_parent) {
      auto o = info[5].As<Napi::Object>();
      auto idx = o.Get("index").As<Napi::Uint32Array>();
      auto file = o.Get("file").As<Napi::Uint32Array>();
      auto off = o.Get("offset").As<Napi::BigUint64Array>();
      parent.index = idx.Data();
      parent.file = file.Data();
      parent.offset = off.Data();
      parent.count = idx.ElementLength();
      Napi::Value written = o.Get("written");
      if (written.IsTypedArray()) {
        auto w = written.As<Napi::Uint32Array>();
        parent.written = w.Data();
        parent.nwritten = w.ElementLength() / 2;
        parent.tracked = 1;
      }
    }
    pages_forked_from forked{};
    bool has_forked = info.Length() > 6 && info[6].IsObject();
    if (has_forked) {
      auto o = info[6].As<Napi::Object>();
      forked.pid = o.Get("pid").As<Napi::Number>().Int32Value();
      forked.pagemap_fd = o.Get("pagemapFd").As<Napi::Number>().Int32Value();
    }
    pages_result r;
    int rc = pw_dump(&w_, Tid(info), info[1].As<Napi::Number>().Int32Value(), U64(info[2]),
                     U64(info[3]), static_cast<pages_mode>(info[4].As<Napi::Number>().Int32Value()),
                     has_parent ? &parent : nullptr, has_forked ? &forked : nullptr, &r);
    Napi::Value result = env.Undefined();
    if (!Failed(env, rc, "copying memory of process " + std::to_string(Tid(info)))) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("offset", Napi::Number::New(env, static_cast<double>(r.data_offset)));
      o.Set("runs", Pairs(env, r.runs, r.nruns));
      o.Set("same", Pairs(env, r.same, r.nsame));
      o.Set("shared", Pairs(env, r.shared, r.nshared));
      o.Set("pages", Napi::Number::New(env, static_cast<double>(r.pages_written)));
      result = o;
    }
    free(r.runs);
    free(r.same);
    free(r.shared);
    return result;
  }

  // dumpScanned(pid, pagemapFd, bounds, modes) -> { offsets, counts, runs, pages }
  // or undefined: what dump gives for each of several mappings of one
  // process, none with a parent or a process forked from, in one call and
  // one PAGEMAP_SCAN (pages_scan_present) per run of adjacent ones instead
  // of a call and a pagemap read each. bounds: BigUint64Array [start, end] per mapping, ascending;
  // modes: Uint8Array (PAGES_ANON or PAGES_PRIVATE_FILE). offsets:
  // Float64Array, where each one's pages start; counts: Uint32Array, its
  // runs; runs: Uint32Array, every one's (first, count) pairs in order;
  // pages: how many were stored in all.
  // Undefined where the kernel has no PAGEMAP_SCAN: the caller dumps them
  // one by one. A mapping that cannot be read throws, with `index` its
  // place in bounds.
  Napi::Value DumpScanned(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Check(env) || !w_.buf) return env.Undefined();
    pid_t pid = Tid(info);
    int pagemap = info[1].As<Napi::Number>().Int32Value();
    auto bounds = info[2].As<Napi::BigUint64Array>();
    auto modes = info[3].As<Napi::Uint8Array>();
    size_t n = modes.ElementLength();
    if (bounds.ElementLength() != 2 * n) {
      Napi::TypeError::New(env, "dumpScanned: two bounds per mode").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    for (size_t i = 0; i < n; i++)
      if (bounds[2 * i] >= bounds[2 * i + 1] || (i && bounds[2 * i] < bounds[2 * i - 1]) ||
          (modes[i] != PAGES_ANON && modes[i] != PAGES_PRIVATE_FILE)) {
        Napi::TypeError::New(env, "dumpScanned: mappings out of order, or a mode it does not take").ThrowAsJavaScriptException();
        return env.Undefined();
      }
    auto offsets = Napi::Float64Array::New(env, n);
    auto counts = Napi::Uint32Array::New(env, n);
    std::vector<uint32_t> runs;
    double pages = 0;
    if (n) {
      // One scan per run of adjacent mappings: what lies between them (a
      // library's code and read-only data, not read) is not walked.
      std::vector<struct appshot_page_region> regions;
      for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && bounds[2 * j] == bounds[2 * j - 1]) j++;
        struct appshot_page_region* got = nullptr;
        long nr = pages_scan_present(pagemap, bounds[2 * i], bounds[2 * j - 1], &got);
        if (nr == -ENOTTY || nr == -EINVAL || nr == -EOPNOTSUPP) return env.Undefined();
        if (Failed(env, static_cast<int>(nr), "PAGEMAP_SCAN of process " + std::to_string(pid))) return env.Undefined();
        regions.insert(regions.end(), got, got + nr);
        free(got);
        i = j;
      }
      size_t cursor = 0;
      for (size_t i = 0; i < n; i++) {
        pages_result r;
        int rc = pw_dump_scanned(&w_, pid, regions.data(), regions.size(), &cursor, bounds[2 * i],
                                 bounds[2 * i + 1], static_cast<pages_mode>(modes[i]), &r);
        if (rc == 0) {
          offsets[i] = static_cast<double>(r.data_offset);
          counts[i] = static_cast<uint32_t>(r.nruns);
          pages += static_cast<double>(r.pages_written);
          runs.insert(runs.end(), r.runs, r.runs + 2 * r.nruns);
        }
        free(r.runs);
        free(r.same);
        free(r.shared);
        if (rc) {
          Napi::Error e = Napi::Error::New(env, "copying memory of process " + std::to_string(pid) + ": " + std::strerror(-rc));
          const char* name = strerrorname_np(-rc);
          e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
          e.Set("errno", Napi::Number::New(env, -rc));
          e.Set("index", Napi::Number::New(env, static_cast<double>(i)));
          e.ThrowAsJavaScriptException();
          return env.Undefined();
        }
      }
    }
    Napi::Object o = Napi::Object::New(env);
    o.Set("offsets", offsets);
    o.Set("counts", counts);
    o.Set("runs", Pairs(env, runs.data(), runs.size() / 2));
    o.Set("pages", Napi::Number::New(env, pages));
    return o;
  }

  // append(buffer) -> offset
  Napi::Value Append(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Check(env)) return env.Undefined();
    auto b = info[0].As<Napi::Buffer<uint8_t>>();
    uint64_t off;
    if (Failed(env, pw_append(&w_, b.Data(), b.Length(), &off), "writing page data"))
      return env.Undefined();
    return Napi::Number::New(env, static_cast<double>(off));
  }

  // appendFd(fd, length) -> { offset, runs }
  Napi::Value AppendFd(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Check(env)) return env.Undefined();
    uint32_t* runs = nullptr;
    size_t nruns = 0;
    uint64_t off;
    int rc = pw_append_fd(&w_, info[0].As<Napi::Number>().Int32Value(), U64(info[1]), &runs,
                          &nruns, &off);
    Napi::Value result = env.Undefined();
    if (!Failed(env, rc, "copying shared memory")) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("offset", Napi::Number::New(env, static_cast<double>(off)));
      o.Set("runs", Pairs(env, runs, nruns));
      result = o;
    }
    free(runs);
    return result;
  }

  // finish(deferSync?) -> { size, chunkSize, chunks, drainMs, fsyncMs }:
  // flushed and synced; still unnamed. `chunks`: the SHA-256 of each
  // chunkSize bytes of the file, hashed as they were written. With
  // deferSync, the fsync is started and left running (fsyncMs 0):
  // synced() waits for it.
  Napi::Value Finish(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Check(env)) return env.Undefined();
    int rc = pw_finish(&w_, info.Length() > 0 && info[0].IsBoolean() && info[0].As<Napi::Boolean>().Value());
    Unmap();
    if (Failed(env, rc, "writing page data")) return env.Undefined();
    Napi::Object o = Napi::Object::New(env);
    o.Set("size", Napi::Number::New(env, static_cast<double>(w_.size)));
    o.Set("chunkSize", Napi::Number::New(env, PAGES_CHUNK));
    size_t nchunks = 0;
    const uint8_t* table = pw_chunk_table(&w_, &nchunks);
    o.Set("chunks", Napi::Buffer<uint8_t>::Copy(env, table ? table : reinterpret_cast<const uint8_t*>(""), nchunks * PAGES_DIGEST));
    o.Set("hashMs", Napi::Number::New(env, static_cast<double>(w_.hash_wait_ns) / 1e6));
    o.Set("drainMs", Napi::Number::New(env, static_cast<double>(w_.drain_ns) / 1e6));
    o.Set("fsyncMs", Napi::Number::New(env, static_cast<double>(w_.fsync_ns) / 1e6));
    return o;
  }

  // synced() -> the fsync's own milliseconds: waits for the fsync that
  // finish(true) started (0 if none is pending); throws its error.
  Napi::Value Synced(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Check(env)) return env.Undefined();
    bool pending = w_.file_sync_pending;
    if (Failed(env, pw_synced(&w_), "syncing page data")) return env.Undefined();
    return Napi::Number::New(env, pending ? static_cast<double>(w_.fsync_ns) / 1e6 : 0);
  }

  // link(path): names the finished file.
  Napi::Value Link(const Napi::CallbackInfo& info) {
    std::string path = info[0].As<Napi::String>().Utf8Value();
    Failed(info.Env(), pw_link(&w_, path.c_str()), "naming " + path);
    return info.Env().Undefined();
  }

  // written() -> bytes in the file so far (for progress).
  Napi::Value Written(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), open_ ? static_cast<double>(pw_written(&w_)) : 0);
  }

  // drain(timeoutMs): waits a while for the writer thread to catch up.
  Napi::Value Drain(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!Check(env) || !w_.buf) return env.Undefined();
    Failed(env, pw_drain(&w_, info[0].As<Napi::Number>().Int32Value()), "writing page data");
    return env.Undefined();
  }

  // reserve(bytes) -> 0 or -errno: see pw_reserve (an error is no failure).
  Napi::Value Reserve(const Napi::CallbackInfo& info) {
    int rc = open_ && w_.buf ? pw_reserve(&w_, U64(info[0])) : 0;
    return Napi::Number::New(info.Env(), rc);
  }

  // startHashing(all): see pw_hash_start.
  Napi::Value StartHashing(const Napi::CallbackInfo& info) {
    if (open_ && w_.buf) pw_hash_start(&w_, info[0].ToBoolean());
    return info.Env().Undefined();
  }

  // startFlushing(): see pw_flush_start.
  Napi::Value StartFlushing(const Napi::CallbackInfo& info) {
    if (open_ && w_.buf) pw_flush_start(&w_);
    return info.Env().Undefined();
  }

  // fd(): the file's descriptor, for streaming it out.
  Napi::Value Fd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), w_.file_fd); }

  // abort(): closes the file (which vanishes if it was never linked).
  // close(): the same, once it is linked (or streamed): nothing of it is
  // held any longer, which a resident engine would otherwise do until the
  // object is collected: the file's descriptor, and with it the disk
  // space and page cache of an image removed meanwhile.
  Napi::Value Abort(const Napi::CallbackInfo& info) {
    if (open_) pw_abort(&w_);
    open_ = false;
    Unmap();
    return info.Env().Undefined();
  }

  page_writer w_{};
  bool open_ = false;
  std::vector<const uint8_t*> maps_;
  std::vector<uint64_t> sizes_;
};

// scanWritten(pagemapFd, start, end, reset) -> Uint32Array of (first page,
// count) pairs written since the range was last write-protected, or null
// when the range is not tracked (no userfaultfd-wp registration there).
Napi::Value ScanWritten(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t* pairs = nullptr;
  long n = pages_scan_written(info[0].As<Napi::Number>().Int32Value(), U64(info[1]), U64(info[2]),
                              info[3].ToBoolean(), &pairs);
  if (n < 0) {
    if (n == -EPERM || n == -EINVAL || n == -ENOTTY || n == -EOPNOTSUPP) return env.Null();
    ThrowErrno(env, "PAGEMAP_SCAN", static_cast<int>(-n));
    return env.Undefined();
  }
  auto out = Pairs(env, pairs, static_cast<size_t>(n));
  free(pairs);
  return out;
}

// What a PAGEMAP_SCAN that failed with `n` (-errno) answers: null where
// the kernel has none, else an exception.
static Napi::Value ScanFailed(Napi::Env env, long n) {
  if (n == -EINVAL || n == -ENOTTY || n == -EOPNOTSUPP) return env.Null();
  ThrowErrno(env, "PAGEMAP_SCAN", static_cast<int>(-n));
  return env.Undefined();
}

// scanAny(pagemapFd, start, end) -> whether [start, end) holds a page
// present or swapped (one PAGEMAP_SCAN, stopping at the first), or null
// where the kernel has no PAGEMAP_SCAN.
Napi::Value ScanAny(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  long n = pages_scan_any(info[0].As<Napi::Number>().Int32Value(), U64(info[1]), U64(info[2]));
  if (n < 0) return ScanFailed(env, n);
  return Napi::Boolean::New(env, n > 0);
}

// scanFirst(pagemapFd, start, end) -> the address of the first page in
// [start, end) present or swapped, false where there is none, or null
// where the kernel has no PAGEMAP_SCAN.
Napi::Value ScanFirst(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t first = 0;
  long n = pages_scan_first(info[0].As<Napi::Number>().Int32Value(), U64(info[1]), U64(info[2]), &first);
  if (n < 0) return ScanFailed(env, n);
  if (n == 0) return Napi::Boolean::New(env, false);
  return Napi::BigInt::New(env, first);
}

// scanCount(pagemapFd, start, end, limit) -> how many pages of [start, end)
// are present or swapped, up to limit; null where the kernel has no
// PAGEMAP_SCAN.
Napi::Value ScanCount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  long n = pages_scan_count(info[0].As<Napi::Number>().Int32Value(), U64(info[1]), U64(info[2]), U64(info[3]));
  if (n < 0) return ScanFailed(env, n);
  return Napi::Number::New(env, static_cast<double>(n));
}

// crc32c(buffer, seed = 0) -> number
Napi::Value Crc32c(const Napi::CallbackInfo& info) {
  auto b = info[0].As<Napi::Buffer<uint8_t>>();
  uint32_t seed = info.Length() > 1 ? info[1].As<Napi::Number>().Uint32Value() : 0;
  return Napi::Number::New(info.Env(), pages_crc32c(seed, b.Data(), b.Length()));
}

// crc32cFile(path | fd) -> { size, crc }: of a descriptor, read from
// where it stands and left open (restore/verify.ts opens a mapped file as
// the process that maps it, and checks it is a regular file, first).
Napi::Value Crc32cFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const bool given = info[0].IsNumber();
  std::string what = given ? "descriptor " + std::to_string(info[0].As<Napi::Number>().Int32Value()) : info[0].As<Napi::String>().Utf8Value();
  int fd = given ? info[0].As<Napi::Number>().Int32Value() : open(what.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    ThrowErrno(env, "opening " + what, given ? EBADF : errno);
    return env.Undefined();
  }
  // Not a buffer of its own: 4 MiB zero-filled per call was memory
  // touched for the first time per call, 15-18 ms of the first files'
  // checksums in each snapshot on this project's VM (pages.c, kept).
  uint32_t crc = 0;
  uint64_t size = 0;
  int rc = pages_crc32c_fd(fd, &crc, &size);
  if (!given) close(fd);
  if (rc) {
    ThrowErrno(env, "reading " + what, -rc);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("size", Napi::Number::New(env, static_cast<double>(size)));
  o.Set("crc", Napi::Number::New(env, crc));
  return o;
}

// releaseKeptBuffers(unusedSeconds) -> how many of the buffers kept warm
// between page files (pages.c) were unmapped: those unused that long.
Napi::Value ReleaseKeptBuffers(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), pages_release_kept(info[0].As<Napi::Number>().Int32Value()));
}

// ---- descriptors

// sameDescription(pid1, fd1, pid2, fd2) -> whether the two descriptors are
// one open file description (kcmp KCMP_FILE).
Napi::Value SameDescription(const Napi::CallbackInfo& info) {
  const int KCMP_FILE = 0;
  long r = syscall(SYS_kcmp, Tid(info, 0), Tid(info, 2), KCMP_FILE, info[1].As<Napi::Number>().Int32Value(),
                   info[3].As<Napi::Number>().Int32Value());
  return Napi::Boolean::New(info.Env(), r == 0);
}

// descriptionGroups(pids, fds) -> for each descriptor i (process pids[i],
// number fds[i]), the lowest index of the descriptors that are one open
// file description with it (itself if none is), or null for all where the
// kernel has no kcmp (each then its own). The descriptors are sorted by
// kcmp(KCMP_FILE)'s ordering of descriptions, so that sharers end side by
// side: n log n comparisons, not the n^2 of comparing every pair (2,000
// descriptors of one file froze an application for seconds), after one
// pass that takes out the first descriptor's sharers. A merge sort
// of our own: bounded whatever the comparisons answer, where std::sort is
// undefined (may run off the array) if a failed kcmp broke the ordering.
Napi::Value DescriptionGroups(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int KCMP_FILE = 0;
  Napi::Array pidsIn = info[0].As<Napi::Array>(), fdsIn = info[1].As<Napi::Array>();
  size_t n = pidsIn.Length();
  if (fdsIn.Length() != n) {
    Napi::TypeError::New(env, "descriptionGroups: as many fds as pids").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::vector<pid_t> pid(n);
  std::vector<int> fd(n);
  for (size_t i = 0; i < n; i++) {
    pid[i] = pidsIn.Get(i).As<Napi::Number>().Int32Value();
    fd[i] = fdsIn.Get(i).As<Napi::Number>().Int32Value();
  }
  if (n && syscall(SYS_kcmp, pid[0], pid[0], KCMP_FILE, fd[0], fd[0]) < 0 && errno == ENOSYS) return env.Null();
  int failed = 0;
  size_t failedAt = 0;
  // kcmp: 0 the same description, 1 the first before, 2 after.
  auto cmp = [&](size_t a, size_t b) -> long {
    long r = syscall(SYS_kcmp, pid[a], pid[b], KCMP_FILE, fd[a], fd[b]);
    if (r < 0 && !failed) {
      failed = errno;
      failedAt = a;
    }
    return r;
  };
  // First, one pass against the first descriptor: the common case, one
  // description dup'd many times, costs n - 1 comparisons, not n log n.
  std::vector<size_t> group(n, n), order, scratch;
  if (n) group[0] = 0;
  for (size_t i = 1; i < n && !failed; i++) {
    if (cmp(0, i) == 0) group[i] = 0;
    else order.push_back(i);
  }
  size_t m = order.size();
  scratch.resize(m);
  for (size_t width = 1; width < m && !failed; width *= 2) {
    for (size_t lo = 0; lo < m; lo += 2 * width) {
      size_t mid = std::min(lo + width, m), hi = std::min(lo + 2 * width, m), a = lo, b = mid, k = lo;
      while (a < mid && b < hi) scratch[k++] = cmp(order[b], order[a]) == 1 ? order[b++] : order[a++];
      while (a < mid) scratch[k++] = order[a++];
      while (b < hi) scratch[k++] = order[b++];
    }
    order.swap(scratch);
  }
  for (size_t k = 0; k < m && !failed; k++) {
    size_t i = order[k];
    group[i] = i;
    if (k > 0 && cmp(order[k - 1], i) == 0) group[i] = group[order[k - 1]];
  }
  if (failed) {
    ThrowErrno(env, "comparing open file descriptions (kcmp) of process " + std::to_string(pid[failedAt]) + " fd " + std::to_string(fd[failedAt]), failed);
    return env.Undefined();
  }
  // The lowest index of each group, as the result says.
  std::vector<size_t> lowest(n, n);
  for (size_t i = 0; i < n; i++) lowest[group[i]] = std::min(lowest[group[i]], i);
  Napi::Array out = Napi::Array::New(env, n);
  for (size_t i = 0; i < n; i++) out.Set(i, Napi::Number::New(env, static_cast<double>(lowest[group[i]])));
  return out;
}

// epollTargetIs(pid, epfd, tfd, toff, fd) -> whether the `toff`th target
// of epoll `epfd` registered under number `tfd` is the open file
// description that `fd` of the same process is (kcmp KCMP_EPOLL_TFD): the
// registered number may since have been closed or reused.
Napi::Value EpollTargetIs(const Napi::CallbackInfo& info) {
  const int KCMP_EPOLL_TFD = 7;
  struct {
    uint32_t efd, tfd, toff;
  } slot = {static_cast<uint32_t>(info[1].As<Napi::Number>().Int32Value()), static_cast<uint32_t>(info[2].As<Napi::Number>().Int32Value()),
            static_cast<uint32_t>(info[3].As<Napi::Number>().Int32Value())};
  pid_t pid = Tid(info, 0);
  long r = syscall(SYS_kcmp, pid, pid, KCMP_EPOLL_TFD, info[4].As<Napi::Number>().Int32Value(), &slot);
  return Napi::Boolean::New(info.Env(), r == 0);
}

// compareFileTables(pid1, pid2) -> kcmp(KCMP_FILES): 0 if the two
// processes share one descriptor table (CLONE_FILES), else 1 or 2 (an
// ordering of the tables), -1 if the kernel cannot say.
Napi::Value CompareFileTables(const Napi::CallbackInfo& info) {
  const int KCMP_FILES = 2;
  long r = syscall(SYS_kcmp, Tid(info, 0), Tid(info, 1), KCMP_FILES, 0, 0);
  return Napi::Number::New(info.Env(), r < 0 ? -1 : static_cast<double>(r));
}

// compareFsStructs(tid1, tid2) -> kcmp(KCMP_FS): 0 if the two tasks share
// one working directory, root and umask (CLONE_FS), else 1 or 2, -1 if
// the kernel cannot say.
Napi::Value CompareFsStructs(const Napi::CallbackInfo& info) {
  const int KCMP_FS = 3;
  long r = syscall(SYS_kcmp, Tid(info, 0), Tid(info, 1), KCMP_FS, 0, 0);
  return Napi::Number::New(info.Env(), r < 0 ? -1 : static_cast<double>(r));
}

// compareMms(pid1, pid2) -> kcmp(KCMP_VM): 0 if the two tasks share one
// memory (CLONE_VM), else 1 or 2, -1 if the kernel cannot say.
Napi::Value CompareMms(const Napi::CallbackInfo& info) {
  const int KCMP_VM = 1;
  long r = syscall(SYS_kcmp, Tid(info, 0), Tid(info, 1), KCMP_VM, 0, 0);
  return Napi::Number::New(info.Env(), r < 0 ? -1 : static_cast<double>(r));
}

// bytesToRead(fd) -> ioctl(FIONREAD): the bytes a read would find queued
// (an inotify or fanotify instance's events), -errno if it cannot say.
Napi::Value BytesToRead(const Napi::CallbackInfo& info) {
  int n = 0;
  if (ioctl(info[0].As<Napi::Number>().Int32Value(), FIONREAD, &n) != 0) return Napi::Number::New(info.Env(), -errno);
  return Napi::Number::New(info.Env(), n);
}

// getFd(pid, fd) -> a duplicate of the process's descriptor, in this process.
// fdEntries(pid) -> [{ fd, target, info, uid?, gid?, mode? }]: every descriptor of a process
// with its /proc/PID/fd link and its /proc/PID/fdinfo text, in ascending
// order, read in one call: a server with thousands of connections had a
// readlink and a file read through Node for each, inside the frozen
// window. A descriptor closed meanwhile is left out.
Napi::Value FdEntries(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string base = "/proc/" + std::to_string(Tid(info));
  int fdDir = open((base + "/fd").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fdDir < 0) {
    ThrowErrno(env, "reading " + base + "/fd", errno);
    return env.Undefined();
  }
  int infoDir = open((base + "/fdinfo").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  // Close-on-exec from the start: a supervisor may be spawned on another
  // thread at any moment (spawnDetachedAsync) and must not inherit it.
  DIR* d = infoDir >= 0 ? fdopendir(fcntl(fdDir, F_DUPFD_CLOEXEC, 0)) : nullptr;
  if (!d) {
    int e = errno;
    close(fdDir);
    if (infoDir >= 0) close(infoDir);
    ThrowErrno(env, "reading " + base + "/fdinfo", e);
    return env.Undefined();
  }
  std::vector<int> fds;
  while (struct dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    fds.push_back(atoi(e->d_name));
  }
  closedir(d);
  std::sort(fds.begin(), fds.end());
  Napi::Array out = Napi::Array::New(env);
  uint32_t n = 0;
  std::vector<char> text(4096);
  for (int fd : fds) {
    char name[16], target[4096];
    snprintf(name, sizeof name, "%d", fd);
    ssize_t tl = readlinkat(fdDir, name, target, sizeof target - 1);
    if (tl < 0) continue;
    target[tl] = '\0';
    int f = openat(infoDir, name, O_RDONLY | O_CLOEXEC);
    if (f < 0) continue;
    size_t len = 0;
    for (;;) {
      if (len == text.size()) text.resize(text.size() * 2);
      ssize_t r = read(f, text.data() + len, text.size() - len);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      len += static_cast<size_t>(r);
    }
    close(f);
    Napi::Object o = Napi::Object::New(env);
    o.Set("fd", fd);
    o.Set("target", Napi::String::New(env, target, static_cast<size_t>(tl)));
    o.Set("info", Napi::String::New(env, text.data(), len));
    // A pipe's or socket's inode owner (the image's InodeOwner): the
    // link followed to the inode, in the same pass.
    struct stat st;
    if ((strncmp(target, "pipe:", 5) == 0 || strncmp(target, "socket:", 7) == 0) && fstatat(fdDir, name, &st, 0) == 0) {
      o.Set("uid", Napi::Number::New(env, st.st_uid));
      o.Set("gid", Napi::Number::New(env, st.st_gid));
      o.Set("mode", Napi::Number::New(env, st.st_mode & 07777));
    }
    out.Set(n++, o);
  }
  close(fdDir);
  close(infoDir);
  return out;
}

// One mapping's header line of /proc/PID/smaps (as maps prints it):
// "start-end perms pgoff major:minor ino   path". False if it is not one.
struct SmapsHeader {
  uint64_t start, end, pgoff, ino;
  unsigned major, minor, perms;
  const char* path;
  size_t path_len;
};

bool ParseSmapsHeader(const char* p, const char* end, SmapsHeader* h) {
  auto hex = [&](uint64_t* out, char stop) {
    const char* q = p;
    uint64_t v = 0;
    while (p < end && ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) v = v * 16 + static_cast<uint64_t>(*p <= '9' ? *p - '0' : *p - 'a' + 10), p++;
    if (p == q || p >= end || *p != stop) return false;
    p++;
    *out = v;
    return true;
  };
  uint64_t major, minor;
  if (!hex(&h->start, '-') || !hex(&h->end, ' ')) return false;
  if (end - p < 5 || p[4] != ' ') return false;
  h->perms = (p[0] == 'r' ? 1 : 0) | (p[1] == 'w' ? 2 : 0) | (p[2] == 'x' ? 4 : 0) | (p[3] == 's' ? 8 : 0);
  for (int i = 0; i < 4; i++)
    if (p[i] == ' ' || p[i] == '\t') return false;
  p += 5;
  if (!hex(&h->pgoff, ' ') || !hex(&major, ':') || !hex(&minor, ' ')) return false;
  h->major = static_cast<unsigned>(major);
  h->minor = static_cast<unsigned>(minor);
  const char* q = p;
  uint64_t ino = 0;
  while (p < end && *p >= '0' && *p <= '9') ino = ino * 10 + static_cast<uint64_t>(*p - '0'), p++;
  if (p == q) return false;
  h->ino = ino;
  while (p < end && (*p == ' ' || *p == '\t')) p++;
  h->path = p;
  h->path_len = static_cast<size_t>(end - p);
  return true;
}

// /proc/PID/smaps, parsed here rather than as text in JS (a snapshot reads
// it in its frozen window, and parsing its ~25 lines per mapping in JS cost
// about what the kernel took to print them): per mapping its header, its
// kB of anonymous pages and in swap, and its VmFlags line as it is (a few
// distinct lines in a process: the caller picks the flags it keeps once
// per distinct line).
// { addr: BigUint64Array [start, end, pgoff, ino] per mapping,
//   num: Float64Array [major, minor, perms bits (r 1, w 2, x 4, s 8),
//   anonKb, swapKb] per mapping, paths: [string], flags: [string] }.
Napi::Value ParsedSmaps(Napi::Env env, const char* text, size_t len) {
  struct Row {
    SmapsHeader h;
    double anon = 0, swap = 0;
    const char* flags = nullptr;
    size_t flags_len = 0;
  };
  std::vector<Row> rows;
  const char* end = text + len;
  for (const char* at = text; at < end;) {
    const char* nl = static_cast<const char*>(memchr(at, '\n', static_cast<size_t>(end - at)));
    if (!nl) nl = end;
    char c = *at;
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) {
      Row r;
      if (ParseSmapsHeader(at, nl, &r.h)) rows.push_back(r);
    } else if (!rows.empty()) {
      Row& r = rows.back();
      size_t n = static_cast<size_t>(nl - at);
      if (n >= 8 && !memcmp(at, "VmFlags:", 8)) {
        const char* f = at + 8;
        const char* e = nl;
        while (f < e && (*f == ' ' || *f == '\t')) f++;
        while (e > f && (e[-1] == ' ' || e[-1] == '\t')) e--;
        r.flags = f;
        r.flags_len = static_cast<size_t>(e - f);
      } else if (n > 5 && !memcmp(at, "Swap:", 5)) {
        r.swap = strtod(at + 5, nullptr);
      } else if (n > 10 && !memcmp(at, "Anonymous:", 10)) {
        r.anon = strtod(at + 10, nullptr);
      }
    }
    at = nl + 1;
  }
  auto addr = Napi::BigUint64Array::New(env, rows.size() * 4);
  auto num = Napi::Float64Array::New(env, rows.size() * 5);
  auto paths = Napi::Array::New(env, rows.size());
  auto flags = Napi::Array::New(env, rows.size());
  for (size_t i = 0; i < rows.size(); i++) {
    const Row& r = rows[i];
    addr[i * 4] = r.h.start;
    addr[i * 4 + 1] = r.h.end;
    addr[i * 4 + 2] = r.h.pgoff;
    addr[i * 4 + 3] = r.h.ino;
    num[i * 5] = r.h.major;
    num[i * 5 + 1] = r.h.minor;
    num[i * 5 + 2] = r.h.perms;
    num[i * 5 + 3] = r.anon;
    num[i * 5 + 4] = r.swap;
    paths.Set(static_cast<uint32_t>(i), Napi::String::New(env, r.h.path, r.h.path_len));
    if (r.flags) flags.Set(static_cast<uint32_t>(i), Napi::String::New(env, r.flags, r.flags_len));
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("addr", addr);
  o.Set("num", num);
  o.Set("paths", paths);
  o.Set("flags", flags);
  return o;
}

// readProcFiles(paths, kinds) -> one entry per path: what a frozen
// process's /proc shows, read in one call instead of one Node call (open,
// fstat, read, read, close) per file. kinds[i]: 0 the file as text, 1 as
// bytes, 2 the link's target, 3 the directory's names (sorted by strcmp,
// '.' and '..' left out, as Node's readdirSync gives them), 4 an smaps
// file parsed (ParsedSmaps). An entry that
// cannot be read is undefined: the caller reads it the ordinary way, which
// reports the error as it always did.
Napi::Value ReadProcFiles(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array paths = info[0].As<Napi::Array>();
  Napi::Uint8Array kinds = info[1].As<Napi::Uint8Array>();
  uint32_t n = paths.Length();
  Napi::Array out = Napi::Array::New(env, n);
  std::vector<char> text(16384);
  for (uint32_t i = 0; i < n && i < kinds.ElementLength(); i++) {
    std::string path = paths.Get(i).As<Napi::String>().Utf8Value();
    switch (kinds[i]) {
      case 0:
      case 1:
      case 4: {
        int f = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (f < 0) break;
        size_t len = 0;
        bool ok = true;
        for (;;) {
          if (len == text.size()) text.resize(text.size() * 2);
          ssize_t r = read(f, text.data() + len, text.size() - len);
          if (r < 0 && errno == EINTR) continue;
          if (r < 0) ok = false;
          if (r <= 0) break;
          len += static_cast<size_t>(r);
        }
        close(f);
        if (!ok) break;
        if (kinds[i] == 0) out.Set(i, Napi::String::New(env, text.data(), len));
        else if (kinds[i] == 4) out.Set(i, ParsedSmaps(env, text.data(), len));
        else out.Set(i, Napi::Buffer<char>::Copy(env, text.data(), len));
        break;
      }
      case 2: {
        char target[4096];
        ssize_t tl = readlink(path.c_str(), target, sizeof target);
        // A target as long as the buffer may be cut short: read the usual way.
        if (tl < 0 || tl == static_cast<ssize_t>(sizeof target)) break;
        out.Set(i, Napi::String::New(env, target, static_cast<size_t>(tl)));
        break;
      }
      case 3: {
        DIR* d = opendir(path.c_str());
        if (!d) break;
        std::vector<std::string> names;
        errno = 0;
        while (struct dirent* e = readdir(d)) {
          if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
          names.emplace_back(e->d_name);
        }
        bool ok = errno == 0;
        closedir(d);
        if (!ok) break;
        std::sort(names.begin(), names.end(), [](const std::string& a, const std::string& b) { return strcmp(a.c_str(), b.c_str()) < 0; });
        Napi::Array list = Napi::Array::New(env, names.size());
        for (size_t k = 0; k < names.size(); k++) list.Set(static_cast<uint32_t>(k), Napi::String::New(env, names[k]));
        out.Set(i, list);
        break;
      }
    }
  }
  return out;
}

// The pidfd of the last process getFd took a descriptor from: a dump
// takes every descriptor of one process in a row, and opening a pidfd for
// each cost as much as the copy. A pidfd names its process for good, so a
// PID reused since cannot be reached through it: pidfd_getfd then fails
// (ESRCH) and the PID is opened afresh.
pid_t getfd_pid = 0;
int getfd_pidfd = -1;

Napi::Value GetFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = Tid(info);
  int target = info[1].As<Napi::Number>().Int32Value();
  int fd = -1, e = 0;
  for (int attempt = 0; attempt < 2; attempt++) {
    if (pid != getfd_pid || getfd_pidfd < 0 || attempt) {
      if (getfd_pidfd >= 0) close(getfd_pidfd);
      getfd_pid = 0;
      getfd_pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
      if (getfd_pidfd < 0) {
        ThrowErrno(env, "pidfd_open", errno);
        return env.Undefined();
      }
      getfd_pid = pid;
    }
    fd = static_cast<int>(syscall(SYS_pidfd_getfd, getfd_pidfd, target, 0));
    e = errno;
    if (fd >= 0 || e != ESRCH) break;
  }
  if (fd < 0) {
    ThrowErrno(env, "pidfd_getfd", e);
    return env.Undefined();
  }
  return Napi::Number::New(env, fd);
}

// peekPipe(fd) -> Buffer: what the pipe holds, copied with tee(2) so the
// owner still reads all of it. The pipe's writers are stopped meanwhile.
// Data written in packet mode (O_DIRECT, whatever the ends' flags are now)
// keeps its boundaries in the pipe's buffers, which tee copies: there each
// read returns one packet. The buffer then has `packets`, the length of
// each in order. (A copy whose first read returns all of it is one packet
// if reading one byte of a second copy drops the whole of it.)
Napi::Value PeekPipe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int src = info[0].As<Napi::Number>().Int32Value();
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK)) {
    ThrowErrno(env, "pipe", errno);
    return env.Undefined();
  }
  int size = fcntl(src, F_GETPIPE_SZ);
  if (size > 0) fcntl(p[1], F_SETPIPE_SZ, size);
  std::vector<uint8_t> data;
  std::vector<uint32_t> reads;
  ssize_t n = tee(src, p[1], static_cast<size_t>(size > 0 ? size : 65536), SPLICE_F_NONBLOCK);
  int e = errno;
  if (n > 0) {
    data.resize(n);
    size_t got = 0;
    while (got < static_cast<size_t>(n)) {
      ssize_t r = read(p[0], data.data() + got, n - got);
      if (r <= 0) break;
      got += r;
      reads.push_back(static_cast<uint32_t>(r));
    }
    data.resize(got);
  }
  close(p[0]);
  close(p[1]);
  if (n < 0 && e != EAGAIN) {
    ThrowErrno(env, "tee", e);
    return env.Undefined();
  }
  // All of it or nothing: a copy cut short (our pipe could not be made as
  // big as the process's) would restore a pipe with data missing.
  int held = 0;
  if (ioctl(src, FIONREAD, &held) == 0 && static_cast<size_t>(held) > data.size()) {
    ThrowErrno(env, "copying a pipe's " + std::to_string(held) + " bytes in flight", EMSGSIZE);
    return env.Undefined();
  }
  bool packets = reads.size() > 1;
  if (reads.size() == 1 && data.size() > 1 && !pipe2(p, O_CLOEXEC | O_NONBLOCK)) {
    if (size > 0) fcntl(p[1], F_SETPIPE_SZ, size);
    if (tee(src, p[1], data.size(), SPLICE_F_NONBLOCK) == static_cast<ssize_t>(data.size())) {
      uint8_t one;
      int left = 0;
      if (read(p[0], &one, 1) == 1 && ioctl(p[0], FIONREAD, &left) == 0) packets = left == 0;
    }
    close(p[0]);
    close(p[1]);
  }
  auto out = Napi::Buffer<uint8_t>::Copy(env, data.data(), data.size());
  if (packets) {
    auto lengths = Napi::Array::New(env, reads.size());
    for (size_t i = 0; i < reads.size(); i++) lengths.Set(static_cast<uint32_t>(i), Napi::Number::New(env, reads[i]));
    out.Set("packets", lengths);
  }
  return out;
}

// ---- SysV objects, read without changing them

Napi::Object Perm(const Napi::Env& env, const struct ipc_perm& p) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("key", Napi::Number::New(env, p.__key));
  o.Set("uid", Napi::Number::New(env, p.uid));
  o.Set("gid", Napi::Number::New(env, p.gid));
  o.Set("cuid", Napi::Number::New(env, p.cuid));
  o.Set("cgid", Napi::Number::New(env, p.cgid));
  o.Set("mode", Napi::Number::New(env, p.mode & 0777));
  return o;
}

// semRead(semid) -> { perm, values: number[] }
Napi::Value SemRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int id = info[0].As<Napi::Number>().Int32Value();
  struct semid_ds ds;
  union semun { int val; struct semid_ds* buf; unsigned short* array; } arg;
  arg.buf = &ds;
  if (semctl(id, 0, IPC_STAT, arg)) {
    ThrowErrno(env, "semctl IPC_STAT " + std::to_string(id), errno);
    return env.Undefined();
  }
  std::vector<unsigned short> vals(ds.sem_nsems);
  arg.array = vals.data();
  if (semctl(id, 0, GETALL, arg)) {
    ThrowErrno(env, "semctl GETALL", errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("perm", Perm(env, ds.sem_perm));
  Napi::Array values = Napi::Array::New(env, vals.size());
  Napi::Array pids = Napi::Array::New(env, vals.size());
  for (size_t i = 0; i < vals.size(); i++) {
    values.Set(static_cast<uint32_t>(i), vals[i]);
    pids.Set(static_cast<uint32_t>(i), semctl(id, static_cast<int>(i), GETPID));
  }
  o.Set("values", values);
  o.Set("pids", pids);
  return o;
}

// msgRead(msqid) -> { perm, qbytes, lspid, lrpid, messages: [{type, data}] }
// MSG_COPY reads the n-th message and leaves the queue as it was.
Napi::Value MsgRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int id = info[0].As<Napi::Number>().Int32Value();
  struct msqid_ds ds;
  if (msgctl(id, IPC_STAT, &ds)) {
    ThrowErrno(env, "msgctl IPC_STAT " + std::to_string(id), errno);
    return env.Undefined();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("perm", Perm(env, ds.msg_perm));
  o.Set("qbytes", Napi::Number::New(env, static_cast<double>(ds.msg_qbytes)));
  o.Set("lspid", ds.msg_lspid);
  o.Set("lrpid", ds.msg_lrpid);
  Napi::Array messages = Napi::Array::New(env);
  // A message is at most msgmax bytes (the kernel's limit, settable).
  size_t msgmax = 65536;
  if (FILE* f = fopen("/proc/sys/kernel/msgmax", "re")) {
    unsigned long v;
    if (fscanf(f, "%lu", &v) == 1 && v > msgmax) msgmax = v;
    fclose(f);
  }
  std::vector<uint8_t> buf(sizeof(long) + msgmax);
  for (unsigned long i = 0; i < ds.msg_qnum; i++) {
    ssize_t n = msgrcv(id, buf.data(), msgmax, static_cast<long>(i), IPC_NOWAIT | MSG_COPY);
    if (n < 0) {
      ThrowErrno(env, "msgrcv MSG_COPY", errno);
      return env.Undefined();
    }
    long type;
    std::memcpy(&type, buf.data(), sizeof type);
    Napi::Object m = Napi::Object::New(env);
    m.Set("type", Napi::Number::New(env, static_cast<double>(type)));
    m.Set("data", Napi::Buffer<uint8_t>::Copy(env, buf.data() + sizeof(long), n));
    messages.Set(static_cast<uint32_t>(i), m);
  }
  o.Set("messages", messages);
  return o;
}

}  // namespace

namespace appshot {

void RegisterTrace(Napi::Env env, Napi::Object exports) {
  auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
    exports.Set(name, Napi::Function::New(env, f, name));
  };
  fn("seize", Seize);
  fn("keepOnExit", KeepOnExit);
  fn("keepOnExitAll", KeepOnExitAll);
  fn("detachAll", DetachAll);
  fn("killOnExit", KillOnExit);
  fn("interrupt", Interrupt);
  fn("cont", Cont);
  fn("detach", Detach);
  fn("wait", Wait);
  fn("getRegs", GetRegs);
  fn("setRegs", SetRegs);
  fn("rewind", Rewind);
  fn("getXstate", GetXstate);
  fn("setXstate", SetXstate);
  fn("getSigmask", GetSigmask);
  fn("setSigmask", SetSigmask);
  fn("getSiginfo", GetSiginfo);
  fn("peekSiginfo", PeekSiginfo);
  fn("getRseq", GetRseq);
  fn("getRobustList", GetRobustList);
  fn("inject", Inject);
  fn("forkStopped", ForkStopped);
  fn("endChild", EndChild);
  fn("waitAny", WaitAny);
  fn("batchCode", BatchCode);
  fn("injectBatch", InjectBatch);
  fn("injectBatches", InjectBatches);
  fn("seccompFilters", SeccompFilters);
  fn("suspendSeccomp", SuspendSeccomp);
  fn("securebits", Securebits);
  fn("schedAttributes", SchedAttributes);
  fn("setAffinity", SetAffinity);
  fn("guardAffinity", GuardAffinityNow);
  fn("releaseGuard", ReleaseGuard);
  fn("readMemory", ReadMemory);
  fn("processCpuTimeNs", ProcessCpuTimeNs);
  fn("writeMemory", WriteMemory);
  fn("sockInfo", SockInfo);
  fn("unixSockets", UnixSockets);
  fn("peekSocket", PeekSocket);
  fn("oobPending", OobPending);
  fn("crc32c", Crc32c);
  fn("scanWritten", ScanWritten);
  fn("scanAny", ScanAny);
  fn("scanFirst", ScanFirst);
  fn("scanCount", ScanCount);
  fn("crc32cFile", Crc32cFile);
  fn("releaseKeptBuffers", ReleaseKeptBuffers);
  fn("getFd", GetFd);
  fn("fdEntries", FdEntries);
  fn("readProcFiles", ReadProcFiles);
  fn("sameDescription", SameDescription);
  fn("descriptionGroups", DescriptionGroups);
  fn("epollTargetIs", EpollTargetIs);
  fn("compareFileTables", CompareFileTables);
  fn("compareFsStructs", CompareFsStructs);
  fn("compareMms", CompareMms);
  fn("syscallDispatchMode", SyscallDispatchMode);
  fn("bytesToRead", BytesToRead);
  fn("peekPipe", PeekPipe);
  fn("semRead", SemRead);
  fn("msgRead", MsgRead);
  exports.Set("PageWriter", PageWriter::Define(env));
}

}  // namespace appshot
