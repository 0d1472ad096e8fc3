// The JS face of fsident.h: { fsuid, fsgid, groups: number[], capEff:
// bigint } from src/resources/fsident.ts, held with its groups' storage.
#ifndef APPSHOT_ADDON_FSIDENT_H
#define APPSHOT_ADDON_FSIDENT_H

#include <napi.h>

#include <cstdint>
#include <vector>

extern "C" {
#include "fsident.h"
}

class FsIdentArg {
 public:
  // `v` undefined or null: none (the restorer's own credentials). A value
  // that is not such an object throws a TypeError (and get() is null).
  FsIdentArg(const Napi::Env& env, const Napi::Value& v);
  const fsident* get() const { return set_ ? &id_ : nullptr; }
  bool failed() const { return failed_; }

 private:
  std::vector<uint32_t> groups_;
  fsident id_{};
  bool set_ = false;
  bool failed_ = false;
};

// openAs(path, flags, mode, who?) (called by RegisterDgram).
void RegisterFsIdent(Napi::Env env, Napi::Object exports);

#endif
