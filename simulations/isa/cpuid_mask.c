/* Hides instruction sets from every library in a process, so that a benchmark can time onnxruntime's AVX2 kernels
 * on a CPU that has AVX-512 VNNI. MLAS, PyTorch and oneDNN choose their kernels from CPUID, and MLAS has no switch
 * to hold it to fewer instruction sets; Linux can make CPUID fault instead (ARCH_SET_CPUID, on CPUs whose
 * /proc/cpuinfo lists cpuid_fault), and this library answers each faulting CPUID with the real leaf, minus the
 * masked feature bits.
 *
 * Loaded with LD_PRELOAD; FEDCAM_CPUID_MASK=avx2 clears AVX-512 (every subset), AVX-VNNI and AMX, i.e. an AVX2 and
 * FMA CPU. The dynamic loader and glibc read CPUID before this library's constructor runs, so glibc's own string
 * functions keep the real features; every library that asks after that (MLAS, PyTorch, oneDNN) sees the mask.
 * The setting is per thread, inherited by threads and forks, reset by execve (where the constructor sets it again).
 * A handler the process installs for SIGSEGV later (Python's faulthandler, which pytest enables) is kept aside
 * by the sigaction() below and gets every fault that is not a CPUID. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))
/* Leaf 7, subleaf 0. EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31. ECX: VBMI 1, VBMI2 6,
 * VNNI 11, BITALG 12, VPOPCNTDQ 14. EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX-TILE 24,
 * AMX-INT8 25. Subleaf 1, EAX: AVX-VNNI 4, AVX512-BF16 5. */
static const unsigned AVX2_EBX = BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
static const unsigned AVX2_ECX = BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14);
static const unsigned AVX2_EDX = BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25);
static const unsigned AVX2_EAX_SUB1 = BIT(4) | BIT(5);

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;
static int masking;                    /* this process answers CPUID itself */
static struct sigaction theirs;        /* the SIGSEGV handler the process asked for (SIG_DFL at first) */

static sigaction_fn next_sigaction(void) {
    if (real_sigaction == NULL)
        real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real_sigaction;
}

/* A fault that is not CPUID goes where the process wanted it; with no handler of its own, returning re-runs the
 * faulting instruction under the default action, so the process dies of it as it would have without this library. */
static void pass_on(int sig, siginfo_t *info, void *context) {
    if (theirs.sa_flags & SA_SIGINFO) {
        theirs.sa_sigaction(sig, info, context);
    } else if (theirs.sa_handler != SIG_DFL && theirs.sa_handler != SIG_IGN) {
        theirs.sa_handler(sig);
    } else {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        next_sigaction()(SIGSEGV, &dfl, NULL);
    }
}

static void on_fault(int sig, siginfo_t *info, void *context) {
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    /* A faulting CPUID is a general protection fault (SI_KERNEL); a bad memory access is not, and its instruction
     * pointer may not even be readable. */
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        pass_on(sig, info, context);
        return;
    }
    unsigned leaf = (unsigned)reg[REG_RAX], sub = (unsigned)reg[REG_RCX], r[4];
    set_cpuid(1); /* this thread may run CPUID again for a moment */
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        r[1] &= ~AVX2_EBX;
        r[2] &= ~AVX2_ECX;
        r[3] &= ~AVX2_EDX;
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~AVX2_EAX_SUB1;
    }
    reg[REG_RAX] = r[0];
    reg[REG_RBX] = r[1];
    reg[REG_RCX] = r[2];
    reg[REG_RDX] = r[3];
    reg[REG_RIP] += 2;
}

/* The process' own SIGSEGV handlers are kept aside, not installed: this library's stays in front of them. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !masking)
        return next_sigaction()(sig, act, old);
    if (old != NULL)
        *old = theirs;
    if (act != NULL)
        theirs = *act;
    return 0;
}
/* signal() too (glibc's calls its own sigaction internally, past the one above). */
sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    return sigaction(sig, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void mask_cpuid(void) {
    const char *level = getenv("FEDCAM_CPUID_MASK");
    if (level == NULL || level[0] == '\0')
        return;
    if (strcmp(level, "avx2") != 0) {
        fprintf(stderr, "cpuid_mask: FEDCAM_CPUID_MASK=%s: only 'avx2' is known\n", level);
        _exit(97);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    theirs.sa_handler = SIG_DFL;
    if (next_sigaction()(SIGSEGV, &action, NULL) != 0 || set_cpuid(0) != 0) {
        perror("cpuid_mask: CPUID faulting is not available here (ARCH_SET_CPUID)");
        _exit(97); /* never time a process that thinks it is masked and is not */
    }
    masking = 1;
}
