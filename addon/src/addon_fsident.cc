// The JS face of fsident.c (see addon_fsident.h).
#include "addon_fsident.h"

#include <fcntl.h>

#include <cerrno>
#include <cmath>
#include <string>

#include "addon.h"

namespace {

bool U32(const Napi::Value& v, uint32_t* out) {
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 4294967295.0) || std::floor(d) != d) return false;
  *out = static_cast<uint32_t>(d);
  return true;
}

}  // namespace

bool FsIdentArg::One(const Napi::Env& env, const Napi::Value& v, size_t at) {
  if (!v.IsObject()) {
    Napi::TypeError::New(env, "a filesystem identity must be an object").ThrowAsJavaScriptException();
    return false;
  }
  auto o = v.As<Napi::Object>();
  fsident& id = ids_[at];
  Napi::Value groups = o.Get("groups"), cap = o.Get("capEff");
  if (!U32(o.Get("fsuid"), &id.fsuid) || !U32(o.Get("fsgid"), &id.fsgid) || !groups.IsArray() || !cap.IsBigInt()) {
    Napi::TypeError::New(env, "a filesystem identity is { fsuid, fsgid, groups, capEff: bigint }").ThrowAsJavaScriptException();
    return false;
  }
  auto list = groups.As<Napi::Array>();
  if (list.Length() > FSIDENT_MAX_GROUPS) {
    Napi::TypeError::New(env, "a filesystem identity has too many groups").ThrowAsJavaScriptException();
    return false;
  }
  groups_[at].resize(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++)
    if (!U32(list.Get(i), &groups_[at][i])) {
      Napi::TypeError::New(env, "a filesystem identity's groups are numbers").ThrowAsJavaScriptException();
      return false;
    }
  bool lossless = false;
  id.cap_eff = cap.As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) {
    Napi::TypeError::New(env, "a filesystem identity's capEff is a 64-bit set").ThrowAsJavaScriptException();
    return false;
  }
  id.ngroups = static_cast<uint32_t>(groups_[at].size());
  id.groups = groups_[at].data();
  return true;
}

FsIdentArg::FsIdentArg(const Napi::Env& env, const Napi::Value& v) {
  if (v.IsUndefined() || v.IsNull()) return;
  failed_ = true;
  size_t n = v.IsArray() ? v.As<Napi::Array>().Length() : 1;
  if (n > FSIDENT_MAX_IDENTITIES) {
    Napi::TypeError::New(env, "too many filesystem identities").ThrowAsJavaScriptException();
    return;
  }
  ids_.resize(n);
  groups_.resize(n);
  for (size_t i = 0; i < n; i++)
    if (!One(env, v.IsArray() ? v.As<Napi::Array>().Get(static_cast<uint32_t>(i)) : v, i)) return;
  list_ = {ids_.data(), static_cast<uint32_t>(n)};
  failed_ = false;
}

namespace {

struct OpenCall {
  const char* path;
  int flags;
  unsigned mode;
};

int OpenOp(void* arg) {
  auto* c = static_cast<OpenCall*>(arg);
  return fsident_open(c->path, c->flags | O_CLOEXEC, c->mode);
}

// openAs(path, flags, mode, who?) -> fd: open(2) as `who` (fsident.c), so
// that a name from an image opens what its process could open, no more.
Napi::Value OpenAs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber()) {
    Napi::TypeError::New(env, "openAs(path, flags, mode, who?)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string path = info[0].As<Napi::String>().Utf8Value();
  FsIdentArg who(env, info[3]);
  if (who.failed()) return env.Undefined();
  OpenCall c{path.c_str(), info[1].As<Napi::Number>().Int32Value(), info[2].As<Napi::Number>().Uint32Value()};
  int rc = fsident_run(who.get(), nullptr, OpenOp, &c);
  if (rc < 0) {
    appshot::ThrowErrno(env, "open '" + path + "'", -rc);
    return env.Undefined();
  }
  return Napi::Number::New(env, rc);
}

}  // namespace

void RegisterFsIdent(Napi::Env env, Napi::Object exports) {
  exports.Set("openAs", Napi::Function::New(env, OpenAs, "openAs"));
}
