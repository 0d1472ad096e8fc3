// Shared by the addon's translation units.
#ifndef APPSHOT_ADDON_H
#define APPSHOT_ADDON_H
#include <napi.h>
#include <string>

namespace appshot {
// Throws a JS Error carrying the errno name as `code`, like Node's own fs
// errors, so the CLI can turn it into one clear message.
void ThrowErrno(const Napi::Env& env, const std::string& what, int err);
// A JS number argument as a C int (an fd, a flag word).
inline int Int(const Napi::Value& v) { return v.As<Napi::Number>().Int32Value(); }
// socket(2), made with `owner`'s fsuid and fsgid when it is a {uid, gid}
// object (peercred.c peercred_owned_socket), else as appshot: -1 with
// errno on failure (addon_restore.cc).
int OwnedSocket(const Napi::Value& owner, int family, int type, int protocol);
// The ptrace, page-data and kernel-state readers (addon_trace.cc).
void RegisterTrace(Napi::Env env, Napi::Object exports);
// Objects the restore driver creates and hands over (addon_restore.cc).
void RegisterRestore(Napi::Env env, Napi::Object exports);
// Established TCP connections through repair mode (addon_tcp.cc).
void RegisterTcp(Napi::Env env, Napi::Object exports);
// Datagram and record sockets: names, queues, made again (addon_dgram.cc).
void RegisterDgram(Napi::Env env, Napi::Object exports);
// Kernel feature probes and native versions (addon_probe.cc).
void RegisterProbe(Napi::Env env, Napi::Object exports);
// The front door's forwarding thread (addon_forward.cc).
void RegisterForward(Napi::Env env, Napi::Object exports);
// io_uring counters brought to a snapshot's values (addon_iouring.cc).
void RegisterIoUring(Napi::Env env, Napi::Object exports);
}  // namespace appshot
#endif
