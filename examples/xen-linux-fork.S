/*
 * The fork workload of the Linux guest in the real-Xen tests: a static x86-64 Linux program
 * (no libc) that the guest's /init runs when its kernel command line holds `mcdist.fork`
 * (assembled by examples/xen-dom0.sh).
 *
 * Parent: takes I/O privilege (iopl(3)) so it can print through Xen's debug port 0xe9
 * ("(dN) ..." on Xen's console) without the kernel, fills TABLE_PAGES pages of its .bss
 * with word[i] = i * 0x9e3779b1 (the table of examples/xen-guest.S), prints MCDIST_FORK and
 * spins in user mode until %ebx changes. The host pauses the domain while it spins, reads
 * its memory and gives each clone its vCPU state with %ebx = clone id, %edx = clones.
 * Clone: sums the words of the table pages p with p % clones == id (pages paged in by the
 * memtap on first touch), prints "MCDIST_RESULT id=<hex> n=<hex> sum=<hex>" on port 0xe9,
 * then writes the same line to /dev/kmsg through the clone's kernel (a system call and
 * printk, shown on port 0xe9 by earlyprintk=xen), and spins.
 */
    .set TABLE_PAGES, 2048
    .set SYS_write, 1
    .set SYS_open, 2
    .set SYS_iopl, 172
    .set O_WRONLY, 1

    .text
    .globl _start
_start:
    mov $SYS_iopl, %eax
    mov $3, %edi
    syscall
    mov $SYS_open, %eax
    lea kmsg(%rip), %rdi
    mov $O_WRONLY, %esi
    xor %edx, %edx
    syscall
    mov %eax, %r15d             /* /dev/kmsg, or a negative errno */

    xor %ecx, %ecx
1:  mov %ecx, %eax
    imul $0x9e3779b1, %eax, %eax
    lea table(%rip), %rdi
    mov %eax, (%rdi,%rcx,4)
    inc %ecx
    cmp $(TABLE_PAGES * 1024), %ecx
    jb 1b

    lea msg_fork(%rip), %rsi
    call puts
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

    /* Build the result line in `line`, print it on port 0xe9, then write it to /dev/kmsg. */
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
    movb $0, 1(%rdi)
    lea 1(%rdi), %r14
    lea line+3(%rip), %rsi      /* without the "<2>" (printk level) */
    call puts
    test %r15d, %r15d
    js 6f
    mov $SYS_write, %eax
    mov %r15d, %edi
    lea line(%rip), %rsi
    mov %r14, %rdx
    sub %rsi, %rdx
    syscall
6:  pause
    jmp 6b

/* Print the NUL-terminated string at %rsi on port 0xe9. */
puts:
    lodsb
    test %al, %al
    jz 1f
    out %al, $0xe9
    jmp puts
1:  ret

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
msg_fork:  .asciz "MCDIST_FORK\n"
msg_id:    .asciz "<2>MCDIST_RESULT id="
msg_n:     .asciz " n="
msg_sum:   .asciz " sum="

    .bss
    .align 4096
table:
    .skip TABLE_PAGES * 4096
line:
    .skip 128
