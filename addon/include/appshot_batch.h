/*
 * The batch code (addon/src/trace.c, "Batched injection"): a list of system
 * calls run inside a stopped thread in one stop. The same instructions are
 * assembled twice: into the addon, which copies them into a scratch area it
 * maps in the process (a restore, a process without the preload library),
 * and into the preload library's text, where a snapshot finds them already
 * mapped in every process of the application (no call injected to map an
 * area first, none to unmap it after). The tracer checks that the bytes it
 * finds there are its own before it runs them.
 *
 * APPSHOT_BATCH_CODE(CODE, STOPPED, TRAPPED, END): the instructions, as
 * assembler text, with global labels CODE (the start), STOPPED (where the
 * thread stops itself when done), TRAPPED (the int3 that stands in for a
 * stop that could not be sent) and END, each a string literal.
 */
#ifndef APPSHOT_BATCH_H
#define APPSHOT_BATCH_H

#define APPSHOT_BATCH_CODE(CODE, STOPPED, TRAPPED, END) \
  ".globl " CODE "\n"                          \
  ".globl " STOPPED "\n"                       \
  ".globl " TRAPPED "\n"                       \
  ".globl " END "\n"                           \
    CODE ":\n"                                                              \
    "  mov (%rbx), %r12\n"                                                  \
    "  lea 32(%rbx), %r13\n"                                                \
    "1:\n"                                                                  \
    "  test %r12, %r12\n"                                                   \
    "  jz 2f\n"                                                             \
    "  mov 0(%r13), %rax\n"                                                 \
    /* nr's high half: (a << 16) | k, argument a is entry k's result (k     \
     * from 1), at 32 + (k-1)*64 + 56 = 64k + 24 from the table's start:    \
     * written into the entry's argument a, then loaded with the others. */ \
    "  mov %rax, %rcx\n"                                                    \
    "  shr $32, %rcx\n"                                                     \
    "  jz 3f\n"                                                             \
    "  movzwl %cx, %edx\n"                                                  \
    "  shl $6, %rdx\n"                                                      \
    "  mov 24(%rbx,%rdx), %rdx\n"                                           \
    "  shr $16, %ecx\n"                                                     \
    "  and $7, %ecx\n"                                                      \
    "  mov %rdx, 8(%r13,%rcx,8)\n"                                          \
    "3:\n"                                                                  \
    "  mov %eax, %eax\n"                                                    \
    "  mov 8(%r13), %rdi\n"                                                 \
    "  mov 16(%r13), %rsi\n"                                                \
    "  mov 24(%r13), %rdx\n"                                                \
    "  mov 32(%r13), %r10\n"                                                \
    "  mov 40(%r13), %r8\n"                                                 \
    "  mov 48(%r13), %r9\n"                                                 \
    "  syscall\n"                                                           \
    "  mov %rax, 56(%r13)\n"                                                \
    "  cmp $-4095, %rax\n"                                                  \
    "  jb 4f\n"                                                             \
    /* Failed: the end, unless the header's flags say go on. */             \
    "  testb $1, 24(%rbx)\n"                                                \
    "  jz 2f\n"                                                             \
    "4:\n"                                                                  \
    "  add $64, %r13\n"                                                     \
    "  dec %r12\n"                                                          \
    "  jmp 1b\n"                                                            \
    "2:\n"                                                                  \
    "  mov $234, %eax\n" /* tgkill */                                       \
    "  mov 8(%rbx), %rdi\n"                                                 \
    "  mov 16(%rbx), %rsi\n"                                                \
    /* The end signal, the flags' second byte (see trace.c). */             \
    "  movzbl 25(%rbx), %edx\n"                                             \
    "  syscall\n"                                                           \
    STOPPED ":\n"                                                           \
    /* Reached only when no tracer took the thread at that stop (it was     \
     * killed meanwhile): back to where the thread was, its registers and   \
     * mask as they were, by rt_sigreturn on the frame the tracer wrote at  \
     * r14 (0: none), with the thread's alternate signal stack queried      \
     * into it first, as rt_sigreturn sets that too. */                     \
    "  test %rax, %rax\n"                                                   \
    "  jnz 5f\n"                                                            \
    "  test %r14, %r14\n"                                                   \
    "  jz 5f\n"                                                             \
    "  mov $131, %eax\n" /* sigaltstack(NULL, &uc_stack) */                 \
    "  xor %edi, %edi\n"                                                    \
    "  lea 24(%r14), %rsi\n"                                                \
    "  syscall\n"                                                           \
    "  lea 8(%r14), %rsp\n"                                                 \
    "  mov $15, %eax\n" /* rt_sigreturn */                                  \
    "  syscall\n"                                                           \
    /* Only if tgkill failed (a seccomp filter, say): a trap instead. The   \
     * jump back is to a local label: one to a global symbol of a shared    \
     * object may be assembled to go through its PLT. */                    \
    TRAPPED ":\n"                                                           \
    "5:\n"                                                                  \
    "  int3\n"                                                              \
    "  jmp 5b\n"                                                            \
    END ":\n"

/* The preload library's area for the tables and buffers of the batches a
 * snapshot runs from its copy of the code (appshot_batch_area): untouched
 * by the library itself, in its .bss (no memory until a snapshot writes
 * it), as large as the scratch area it stands for (src/ptrace/remote.ts),
 * so that as many questions go in one stop. */
#define APPSHOT_BATCH_AREA_SIZE (256 * 1024)

#endif
