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
  // `v` undefined or null: none (the restorer's own credentials); one
  // identity, or an array of them to try in order (fsident_run). A value
  // that is neither throws a TypeError, and failed() says so.
  FsIdentArg(const Napi::Env& env, const Napi::Value& v);
  const fsident_list* get() const { return list_.n ? &list_ : nullptr; }
  bool failed() const { return failed_; }

 private:
  bool One(const Napi::Env& env, const Napi::Value& v, size_t at);
  std::vector<std::vector<uint32_t>> groups_;
  std::vector<fsident> ids_;
  fsident_list list_{};
  bool failed_ = false;
};

// openAs(path, flags, mode, who?) (called by RegisterDgram).
void RegisterFsIdent(Napi::Env env, Napi::Object exports);

#endif
