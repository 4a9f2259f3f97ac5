from exhook.main import main

main()
