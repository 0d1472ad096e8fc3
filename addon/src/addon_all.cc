// The addon's C++ as one translation unit, which binding.gyp compiles
// instead of the files below one by one: each of them starts with
// node-addon-api's headers (napi.h and its inline half), whose parsing and
// code generation cost about 1.5 s of CPU per file, more than most of the
// files' own code. One unit costs half the CPU of nine (22 -> 11 s with
// g++ -O3), which every `npm install` pays, the tests' installs included.
//
// What it asks of the files: a name a file keeps to itself (its anonymous
// namespace) must not be defined by another file in the same namespace,
// and a helper two files share belongs in addon.h (Int). The C sources
// stay units of their own (C, not C++).
//
// A developer's edit of any one file recompiles the whole unit (~11 s of
// CPU, against 2-4 s for one file alone); `node-gyp rebuild
// --appshot_cc_units=separate` compiles the files one by one instead.
#include "addon.cc"
#include "addon_trace.cc"
#include "addon_restore.cc"
#include "addon_tcp.cc"
#include "addon_dgram.cc"
#include "addon_fsident.cc"
#include "addon_probe.cc"
#include "addon_forward.cc"
#include "addon_iouring.cc"
#include "addon_procscan.cc"
