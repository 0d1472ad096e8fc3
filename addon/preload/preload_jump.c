/*
 * Translation windows left by a jump (preload.h, struct appshot_id_window).
 *
 * A program's signal handler that runs while one of our wrappers is inside
 * its window and leaves by siglongjmp never lets the wrapper lower it. Left
 * open, the window would hold the thread "inside" for a snapshot for as long
 * as it runs deeper on the stack than where the window began (the snapshot
 * then gives up), and a wait call would not know that the slot its thread
 * still holds is stale (preload_pid.c, do_wait4). So the jumps themselves
 * close the windows they leave: longjmp, _longjmp, siglongjmp and
 * __longjmp_chk are ours, and tail-call glibc's.
 *
 * The same jumps settle the note of a semop in flight they leave
 * (preload_ipc.c, "A jump out of a semop"): a handler the library does
 * not wrap, left by a jump, left it "made" for good.
 *
 * They are called by ordinary programs, some often (interpreters, parsers
 * that bail out by longjmp), from signal handlers too: with no window open
 * (nearly always) a wrapper costs a TLS load and a branch; nothing is
 * allocated, and only the rare path makes a system call (sigaltstack), which
 * is async-signal-safe.
 *
 * Which windows a jump leaves: the jump goes to the stack pointer glibc's
 * setjmp saved in the jmp_buf (mangled with the thread's pointer guard).
 * Each open window's start is recorded (the first APPSHOT_WINDOW_DEPTH):
 * on the stack of the target, a window is left if it began below (deeper
 * than) the target, and all windows inside it with it; so a jump from a
 * handler's inner window back into the handler, inside an outer window
 * the handler interrupted, closes the inner one only. When
 * the two are on different stacks, one of them is the sigaltstack: a
 * window on it, with the target off it, was begun by a handler the jump
 * leaves; a window off it, with the target on it, is one a handler
 * interrupted and the jump stays inside the handler, so it is kept.
 */
#include "preload.h"

#include <dlfcn.h>
#include <setjmp.h>

/* The sigaltstack of this thread, if one is set (a thread running on one
 * it set with SS_AUTODISARM sees none: taken as one stack then). */
struct stacks {
  uintptr_t alt, alt_size;
};
static void stacks_of_thread(struct stacks *s) {
  stack_t ss;
  s->alt = s->alt_size = 0;
  if (SYS2(sigaltstack, NULL, &ss) == 0 && !(ss.ss_flags & SS_DISABLE)) {
    s->alt = (uintptr_t)ss.ss_sp;
    s->alt_size = ss.ss_size;
  }
}
static int on_altstack(const struct stacks *s, uintptr_t sp) {
  return sp - s->alt < s->alt_size;
}

void id_window_above(uintptr_t sp) {
  struct stacks s;
  stacks_of_thread(&s);
  if (on_altstack(&s, sp) == on_altstack(&s, t_id_window.sp))
    t_id_window.open = 0; /* left by a jump our wrappers did not see */
  else
    t_id_window.sp = sp; /* nested, on a higher stack */
}

int g_tls_shared;

/* Threads on one thread pointer: a window that begins while another's is
 * open nests whatever the stacks say (the other thread's stack is
 * anywhere); `sp` is where the first open one began, kept as the deepest
 * of those that open on a raised mark so that the sharer with the lowest
 * stack still reads as inside (the snapshot takes every sharer as inside
 * anyway). A jump then closes nothing: a window left by one stays raised,
 * and the snapshot waits for it until its timeout, refusing by name,
 * rather than guess. */
void id_window_open_shared(uintptr_t sp) {
  int32_t was = __atomic_fetch_add(&t_id_window.open, 1, __ATOMIC_SEQ_CST);
  if (was <= 0 || sp < t_id_window.sp) t_id_window.sp = sp;
}

void id_window_close_shared(void) {
  int32_t open = __atomic_load_n(&t_id_window.open, __ATOMIC_RELAXED);
  while (open > 0 && !__atomic_compare_exchange_n(&t_id_window.open, &open, open - 1, 1,
                                                  __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
}

void id_window_raised_above(uintptr_t older) {
  if (__atomic_load_n(&g_tls_shared, __ATOMIC_RELAXED)) return; /* nests */
  struct stacks s;
  stacks_of_thread(&s);
  if (on_altstack(&s, older) == on_altstack(&s, t_id_window.sp)) {
    t_id_window.began[0] = t_id_window.sp; /* the stub's, now the only one */
    t_id_window.open = 1;
  }
}

/* The stack pointer a jump to `env` resumes with: glibc's x86-64 jmp_buf
 * holds it mangled (PTR_MANGLE: xor with the pointer guard in the TCB at
 * %fs:0x30, then rotate left by 17). */
static uintptr_t jump_target_sp(const struct __jmp_buf_tag *env) {
  enum { JB_RSP = 6 };
  uintptr_t v = (uintptr_t)env->__jmpbuf[JB_RSP], guard;
  __asm__("mov %%fs:0x30, %0" : "=r"(guard));
  return ((v >> 17) | (v << (64 - 17))) ^ guard;
}

/* Closes the windows a jump to `env` leaves (see the top of the file).
 * Called by the stubs below when a window is open. */
__attribute__((used)) void windows_left_by_jump(const struct __jmp_buf_tag *env) HIDDEN;
void windows_left_by_jump(const struct __jmp_buf_tag *env) {
  if (__atomic_load_n(&g_tls_shared, __ATOMIC_RELAXED)) return; /* see above */
  uintptr_t target = jump_target_sp(env);
  struct stacks s;
  stacks_of_thread(&s);
  /* A semop in flight the jump leaves (a handler the library does not
   * wrap interrupted it): its note settled (preload_ipc.c). */
  if (UNLIKELY(__atomic_load_n(&t_semop.state, __ATOMIC_RELAXED) != SEMOP_IDLE)) {
    uintptr_t here;
    __asm__("mov %%rsp, %0" : "=r"(here));
    semop_left_by_jump(target, here, s.alt, s.alt_size);
  }
  int target_alt = on_altstack(&s, target);
  /* The windows a jump leaves are the innermost ones, from the first it
   * leaves on: each later one began inside it. Deeper than those recorded,
   * the windows are kept (the snapshot waits for them, or gives up). */
  int32_t open = t_id_window.open;
  int32_t known = open < APPSHOT_WINDOW_DEPTH ? open : APPSHOT_WINDOW_DEPTH;
  for (int32_t k = 0; k < known; k++) {
    uintptr_t begun = t_id_window.began[k];
    int begun_alt = on_altstack(&s, begun);
    if (begun_alt == target_alt ? begun < target : begun_alt) {
      __atomic_signal_fence(__ATOMIC_SEQ_CST);
      t_id_window.open = k;
      return;
    }
  }
}

/* glibc's, resolved by the constructor below, or at the first jump if one
 * comes sooner (a constructor of a library initialised before ours). */
typedef void (*jump_fn)(struct __jmp_buf_tag *, int);
enum { J_longjmp, J__longjmp, J_siglongjmp, J___longjmp_chk, J_COUNT };
static const char *const jump_names[J_COUNT] = {"longjmp", "_longjmp", "siglongjmp",
                                                "__longjmp_chk"};
__attribute__((used)) jump_fn appshot_real_jumps[J_COUNT] HIDDEN;

__attribute__((used)) jump_fn resolve_jump(int which) HIDDEN;
jump_fn resolve_jump(int which) {
  jump_fn f = (jump_fn)dlsym(RTLD_NEXT, jump_names[which]);
  if (!f) f = (jump_fn)dlsym(RTLD_NEXT, "siglongjmp"); /* all aliases in glibc */
  if (!f) SYS1(exit_group, 127);                        /* no libc: cannot be */
  __atomic_store_n(&appshot_real_jumps[which], f, __ATOMIC_RELAXED);
  return f;
}

__attribute__((constructor)) static void resolve_jumps(void) {
  for (int i = 0; i < J_COUNT; i++) resolve_jump(i);
}

/* The wrappers, in assembly so that glibc's is entered by a jump, on the
 * caller's frame (GCC calls a noreturn function rather than jump to it;
 * __longjmp_chk compares the target with the stack it runs on), with the
 * two arguments kept across our calls. */
#define JUMP_WRAPPER(name, which)                                       \
  ".text\n"                                                             \
  ".globl " #name "\n"                                                  \
  ".type " #name ", @function\n" #name ":\n"                            \
  "  .cfi_startproc\n"                                                  \
  "  endbr64\n"                                                         \
  "  movq t_id_window@gottpoff(%rip), %rax\n"                           \
  "  cmpl $0, %fs:(%rax)\n"                                             \
  "  jg 2f\n"                                                           \
  "  movq t_semop@gottpoff(%rip), %rax\n"                               \
  "  cmpl $0, %fs:(%rax)\n"                                             \
  "  jne 2f\n"                                                          \
  "1:\n"                                                                \
  "  movq appshot_real_jumps+8*" #which "(%rip), %rax\n"                \
  "  testq %rax, %rax\n"                                                \
  "  jz 3f\n"                                                           \
  "  jmp *%rax\n"                                                       \
  "2:\n" /* a window open, or a semop: settle what the jump leaves */  \
  "  pushq %rdi\n  .cfi_adjust_cfa_offset 8\n"                          \
  "  pushq %rsi\n  .cfi_adjust_cfa_offset 8\n"                          \
  "  subq $8, %rsp\n  .cfi_adjust_cfa_offset 8\n"                       \
  "  call windows_left_by_jump\n"                                       \
  "  addq $8, %rsp\n  .cfi_adjust_cfa_offset -8\n"                      \
  "  popq %rsi\n  .cfi_adjust_cfa_offset -8\n"                          \
  "  popq %rdi\n  .cfi_adjust_cfa_offset -8\n"                          \
  "  jmp 1b\n"                                                          \
  "3:\n" /* not resolved yet */                                         \
  "  pushq %rdi\n  .cfi_adjust_cfa_offset 8\n"                          \
  "  pushq %rsi\n  .cfi_adjust_cfa_offset 8\n"                          \
  "  subq $8, %rsp\n  .cfi_adjust_cfa_offset 8\n"                       \
  "  movl $" #which ", %edi\n"                                          \
  "  call resolve_jump\n"                                               \
  "  addq $8, %rsp\n  .cfi_adjust_cfa_offset -8\n"                      \
  "  popq %rsi\n  .cfi_adjust_cfa_offset -8\n"                          \
  "  popq %rdi\n  .cfi_adjust_cfa_offset -8\n"                          \
  "  jmp *%rax\n"                                                       \
  "  .cfi_endproc\n"                                                    \
  ".size " #name ", .-" #name "\n"

/* The indexes are J_* above. */
__asm__(JUMP_WRAPPER(longjmp, 0) JUMP_WRAPPER(_longjmp, 1)
        JUMP_WRAPPER(siglongjmp, 2) JUMP_WRAPPER(__longjmp_chk, 3));
