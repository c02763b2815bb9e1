/*
 * The fork workload of the Linux guest in the real-Xen tests: a static x86-64 Linux program
 * (no libc) that the guest's /init runs when its kernel command line holds `mcdist.fork`
 * (assembled by examples/xen-dom0.sh). It prints only through the kernel: write(2) to
 * /dev/kmsg at a level above `quiet`, which earlyprintk=xen shows on Xen's console
 * ("(dN) ..." from port 0xe9).
 *
 * Parent: fills TABLE_PAGES pages of its .bss with word[i] = i * 0x9e3779b1 (the table of
 * examples/xen-guest.S), prints MCDIST_FORK and spins in user mode until %ebx changes. The
 * host pauses the domain while it spins, reads its memory and gives each clone its vCPU
 * state with %ebx = clone id, %edx = clones.
 * Clone: sums the words of the table pages p with p % clones == id (pages paged in by the
 * memtap on first touch), prints "MCDIST_RESULT id=<hex> n=<hex> sum=<hex>" (a system call
 * and printk in the clone's kernel, paged in the same way) and sleeps in pause(2).
 */
    .set TABLE_PAGES, 2048
    .set SYS_write, 1
    .set SYS_open, 2
    .set SYS_pause, 34
    .set O_WRONLY, 1

    .text
    .globl _start
_start:
    mov $SYS_open, %eax
    lea kmsg(%rip), %rdi
    mov $O_WRONLY, %esi
    xor %edx, %edx
    syscall
    mov %eax, %r15d             /* /dev/kmsg */
    test %eax, %eax
    js 6f
    xor %ecx, %ecx
1:  mov %ecx, %eax
    imul $0x9e3779b1, %eax, %eax
    lea table(%rip), %rdi
    mov %eax, (%rdi,%rcx,4)
    inc %ecx
    cmp $(TABLE_PAGES * 1024), %ecx
    jb 1b

    lea msg_fork(%rip), %rsi
    mov $(msg_fork_end - msg_fork), %edx
    call kwrite
    mov $0xffffffff, %ebx
2:  pause
    cmp $0xffffffff, %ebx
    je 2b

    /* A clone: %ebx = id, %edx = number of clones. */
    mov %edx, %ebp
    xor %r12d, %r12d            /* sum */
    mov %ebx, %ecx              /* page */
    lea table(%rip), %r13
3:  cmp $TABLE_PAGES, %ecx
    jae 5f
    mov %ecx, %esi
    shl $12, %rsi
    add %r13, %rsi
    xor %eax, %eax
4:  add (%rsi,%rax,4), %r12d
    inc %eax
    cmp $1024, %eax
    jb 4b
    add %ebp, %ecx
    jmp 3b

    /* Build the result line in `line` and write it to /dev/kmsg. */
5:  lea line(%rip), %rdi
    lea msg_id(%rip), %rsi
    call cat
    mov %ebx, %eax
    call hex
    lea msg_n(%rip), %rsi
    call cat
    mov %ebp, %eax
    call hex
    lea msg_sum(%rip), %rsi
    call cat
    mov %r12d, %eax
    call hex
    movb $'\n', (%rdi)
    lea 1(%rdi), %rdx
    lea line(%rip), %rsi
    sub %rsi, %rdx
    call kwrite
    /* Sleep in the kernel (the vCPU idles) rather than spin next to the other clones. */
6:  mov $SYS_pause, %eax
    syscall
    jmp 6b

/* write(2) %edx bytes at %rsi to /dev/kmsg (%r15d): one printk record. */
kwrite:
    mov $SYS_write, %eax
    mov %r15d, %edi
    syscall
    ret

/* Copy the NUL-terminated string at %rsi to %rdi (left at the NUL's place). */
cat:
    lodsb
    test %al, %al
    jz 1f
    stosb
    jmp cat
1:  ret

/* Append %eax as 8 hex digits at %rdi; clobbers %eax, %ecx, %edx. */
hex:
    mov $8, %ecx
1:  rol $4, %eax
    mov %eax, %edx
    and $0xf, %edx
    lea hexdigits(%rip), %r8
    movb (%r8,%rdx), %dl
    movb %dl, (%rdi)
    inc %rdi
    dec %ecx
    jnz 1b
    ret

    .section .rodata
kmsg:      .asciz "/dev/kmsg"
hexdigits: .ascii "0123456789abcdef"
msg_fork:  .ascii "<2>MCDIST_FORK\n"
msg_fork_end:
msg_id:    .asciz "<2>MCDIST_RESULT id="
msg_n:     .asciz " n="
msg_sum:   .asciz " sum="

    .data
line:      .skip 128

    .bss
    .align 4096
table:
    .skip TABLE_PAGES * 4096
