from sipbridge.cli import main

main()
