{
  # Six products, all built by `npm install` (node-gyp):
  #  - appshot.node: the Node addon (tables, ptrace, page data)
  #  - appshot_preload.so: the LD_PRELOAD library, plain C, which lives
  #    inside the user's programs and so must not drag in libstdc++
  #  - appshot-init: each application's supervisor (virtual PID 1)
  #  - appshot-keeper: holds an ended application's TCP connections
  #    until its restore (addon/keeper/appshot_keeper.c)
  #  - appshot-guard: lets a snapshot's TCP connections out of repair
  #    mode if the snapshot dies (addon/guard/appshot_guard.c)
  #  - appshot-client: the `appshot` command's hand-over to a resident
  #    engine, without starting Node (addon/client/appshot_client.c)
  "target_defaults": {
    "include_dirs": ["addon/include"],
    "cflags": ["-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"]
  },
  "targets": [
    {
      "target_name": "appshot",
      # The C++ files (addon.cc, addon_trace.cc, ...) are compiled as one
      # unit, addon_all.cc, which includes each: see why there. A new .cc
      # file goes there and in the list below. A developer editing them
      # may build them one by one, each edit then recompiling its own file
      # only: node-gyp rebuild --appshot_cc_units=separate (node-gyp makes
      # an option it does not know a gyp variable).
      "variables": {"appshot_cc_units%": "one"},
      "conditions": [
        ["appshot_cc_units=='separate'", {
          "sources": ["addon/src/addon.cc", "addon/src/addon_trace.cc", "addon/src/addon_restore.cc",
                      "addon/src/addon_tcp.cc", "addon/src/addon_dgram.cc", "addon/src/addon_fsident.cc",
                      "addon/src/addon_probe.cc", "addon/src/addon_forward.cc", "addon/src/addon_iouring.cc", "addon/src/addon_procscan.cc"]
        }, {
          "sources": ["addon/src/addon_all.cc"]
        }]
      ],
      "sources": ["addon/src/trace.c", "addon/src/sockdiag.c",
                  "addon/src/tcp_repair.c", "addon/src/keeper.c",
                  "addon/src/dgram.c", "addon/src/sockfile.c", "addon/src/exename.c", "addon/src/peercred.c",
                  "addon/src/fsident.c", "addon/src/probe.c", "addon/src/forward.c", "addon/src/iouring.c",
                  "addon/src/pages.c", "addon/src/syncs.c", "addon/src/filecopy.c", "addon/src/tablesguard.c", "addon/src/testknobs.c", "addon/src/procscan.c",
                  "addon/include/appshot_table.c"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      # NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS: a throw while an exception
      # is pending already (an argument of the wrong type, read with As<>(),
      # leaves one) keeps the first instead of node-addon-api's fatal
      # error, which aborted the engine and every command it served.
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS", "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17"]
    },
    {
      "target_name": "appshot_preload",
      "type": "shared_library",
      "product_name": "appshot_preload",
      "sources": ["<!@(ls -1 addon/preload/*.c)", "addon/include/appshot_table.c", "addon/include/appshot_used.c"],
      # Node's common.gypi asks for 64-bit file offsets, which renames open,
      # stat, prlimit... to their *64 twins. The preload library defines both
      # names of each itself, so it is compiled without that renaming.
      "defines!": ["_FILE_OFFSET_BITS=64", "_LARGEFILE_SOURCE"],
      # LTO lets the table lookups (appshot_table.c) inline into the
      # wrappers: they sit on every translated call's path.
      "cflags": ["-fPIC", "-fvisibility=hidden", "-ftls-model=initial-exec", "-flto"],
      # --no-undefined: a symbol left undefined (the .symver asm of
      # preload_mutex.c dropped by LTO, say) would stop every program under
      # appshot from loading; the link refuses it instead. Weak references
      # (appshot_test_pause) are still allowed.
      # -flto-partition=one: a top-level .symver asm renames the references
      # of its own object only, and LTO puts top-level asm in one partition
      # of several: which functions share it changed with every file added
      # (preload_mutex.c's real mutex calls went undefined).
      # The version script (addon/preload/preload.map) versions the
      # condition waits as glibc's current ones, so that programs bound to
      # glibc's compatibility versions pass the library by.
      "ldflags": ["-Wl,--as-needed", "-Wl,-z,now", "-Wl,--no-undefined", "-flto", "-flto-partition=one", "-O2",
                  "-Wl,--version-script=<!(pwd)/addon/preload/preload.map"],
      "libraries": ["-ldl", "-lpthread"],
      # The link reads the version script, but gyp's make rules give a link
      # no prerequisites but objects: an empty object made from the script
      # puts it among them, so that an edit of the script relinks.
      "actions": [{
        "action_name": "preload_version_script",
        "inputs": ["addon/preload/preload.map"],
        "outputs": ["<(INTERMEDIATE_DIR)/preload_map.o"],
        "action": ["cc", "-c", "-x", "c", "/dev/null", "-o", "<@(_outputs)"],
        "process_outputs_as_sources": 1
      }]
    },
    {
      "target_name": "appshot-init",
      "type": "executable",
      "sources": ["addon/init/appshot_init.c", "addon/include/appshot_table.c", "addon/include/appshot_used.c"],
      # Static: no dynamic loader on the start of every supervisor (a
      # quarter of its spawn-to-exit time); position-independent, so it
      # keeps address randomisation. Needs libc.a (libc6-dev, which the
      # compiler needs anyway).
      "cflags": ["-fPIE"],
      "ldflags": ["-static-pie"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "appshot-keeper",
      "type": "executable",
      "sources": ["addon/keeper/appshot_keeper.c"],
      "ldflags": ["-Wl,--as-needed"]
    },
    {
      "target_name": "appshot-guard",
      "type": "executable",
      "sources": ["addon/guard/appshot_guard.c"],
      "ldflags": ["-Wl,--as-needed"]
    },
    {
      "target_name": "appshot-client",
      "type": "executable",
      "sources": ["addon/client/appshot_client.c"],
      "ldflags": ["-Wl,--as-needed"]
    }
  ]
}
